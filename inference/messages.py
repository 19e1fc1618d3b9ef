"""One-line messages: what the tools print is one line per event, safe to put in a log.

File names may hold any byte but ``/`` and NUL, and errors from libraries (ITK above all)
span several lines; these helpers turn both into text that cannot break a log line.
"""

from __future__ import annotations


def printable(text: object) -> str:
    r"""``text`` with line breaks, control characters and undecodable bytes escaped.

    Written into a one-line log message as they are, a newline in a file name would start
    a forged line of its own. Undecodable bytes (kept by Python as surrogates) are shown
    as ``\xNN``.
    """
    out = []
    for ch in str(text):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif not ch.isprintable():
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def one_line(text: object) -> str:
    """The first non-empty line of ``text``, stripped (messages are one line each)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def itk_reason(err: Exception) -> str:
    """The line of an ITK error that says what went wrong.

    ITK messages start with a ``file:line`` banner; the ``Description:`` line is the
    useful part. Without one, the last non-empty line (or the exception's type).
    """
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(err).__name__
