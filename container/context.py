"""A build context like the repository's, elsewhere: for images with other model folders.

``docker build`` sends only what ``.dockerignore`` lets through, and the model to bake in
must lie inside the context (``--build-arg MODEL=models/...``). To bake in model folders
from anywhere (an ensemble assembled for a test, a benchmark's edited copy) without
writing into the repository, :func:`copy_build_context` copies what the Dockerfile copies
(its ``COPY`` sources from the context, found by reading the Dockerfile) plus the
Dockerfile and ``.dockerignore`` into a fresh folder, and the model folders into its
``models/``. ``make image-local CONTEXT=FOLDER MODEL=models/NAME`` then builds from it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dockerfile_context_sources(dockerfile: Path = REPO / "Dockerfile") -> list[str]:
    """Sources of every ``COPY`` from the build context (not ``--from`` a stage), as written.

    ARG references (``${MODEL}``) are left unexpanded; wildcards stay wildcards.
    """
    sources = []
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def copy_build_context(
    root: Path, models: Mapping[str, Path], repo: Path = REPO, dockerfile: str = "Dockerfile"
) -> Path:
    """Copy the repository's build context into ``root`` with ``models/<name>`` folders.

    Args:
        root: the new context folder (must not exist).
        models: ``{relative name under models/: model folder}``, e.g.
            ``{"ensemble/a": path_a, "ensemble/b": path_b}``.
        repo: the repository to copy from.
        dockerfile: the Dockerfile's name in ``repo``.

    Returns:
        ``root``.
    """
    root.mkdir(parents=True)
    names = [".dockerignore", dockerfile, *dockerfile_context_sources(repo / dockerfile)]
    for pattern in names:
        if "$" in pattern:
            continue  # the model argument: the models are copied below
        for source in sorted(repo.glob(pattern)):
            target = root / source.relative_to(repo)
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target)
    for name, folder in models.items():
        if re.search(r"(^|/)\.\.(/|$)", name) or name.startswith("/"):
            raise ValueError(f"model name {name!r} must stay inside models/")
        shutil.copytree(folder, root / "models" / name)
    return root
