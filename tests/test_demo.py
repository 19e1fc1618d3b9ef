"""The README's main job, ``make demo`` = ``python -m scripts.demo``, end to end.

Run as ``make`` runs it: the interpreter is the virtual environment's, while ``python3`` on
the PATH may be a bare system Python, so ``predict.sh`` must be pointed at the right one.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_demo_predicts_profiles_and_draws(demo_model, tmp_path):
    out = tmp_path / "demo_out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    # a PATH whose python3 is not this interpreter (as in CI, where make calls .venv/bin/python)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--out", str(out), "--cases", "2",
         "--shape", "32", "96", "96", "--model", str(demo_model)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / "profile" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["FLARE24_0001", "FLARE24_0002"]
    assert all(r["exit_code"] == "0" and r["output_ok"] == "true" for r in rows)
    assert all(float(r["time_s"]) > 0 and float(r["max_rss_mb"]) > 0 for r in rows)
    summary = (out / "summary.md").read_text()
    assert summary.count("| FLARE24_") == 2 and "failed" not in summary
    assert (out / "profile" / "plots" / "time_per_case.png").stat().st_size > 1000
    if "Overlay: overlay.png" in summary:
        assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
