"""The benchmark suite's plumbing, end to end on the CPU (about 45 s on 2 cores).

One real suite run (module fixture): the tiny random model, a tiny synthetic case, our
``sh predict.sh`` (with and without ``--no-skip-air``) and
``nnUNetv2_predict_from_modelfolder --disable_tta`` as real processes under the real
profiler. No timing assertions: only that the figures are wired through.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.results import update_results_file
from benchmarks.stages import breakdown, nnunet_loop_s, parse_log, read_log
from tests.conftest import Payload

CASE = "FLARE24_small"


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    results_md = out / "RESULTS_committed.md"
    (out / ".staging").mkdir()
    (out / ".staging" / "mine.txt").write_text("not the suite's")
    status = main(
        [
            "--cases", "small", "--small-shape", "16", "48", "48",
            "--models", "tiny",
            "--peers", "ours", "ours_noskip", "nnunet_notta",
            "--device", "cpu",
            "-o", str(out),
            "--results", str(results_md),
            "--no-plots", "--no-warm-up", "-q",
        ]
    )  # fmt: skip
    return {"status": status, "out": out, "results_md": results_md}


def _profiled(out: Path, peer: str) -> dict:
    """The profiler's own record of the case (raw measurement, not the suite's summary)."""
    data = json.loads((out / "reports" / "tiny" / peer / "run1" / "results.json").read_text())
    (record,) = data["cases"]
    return record


def test_suite_runs_both_peers_and_keeps_their_outputs(suite_run):
    assert suite_run["status"] == 0
    for peer in ("ours", "nnunet_notta"):
        record = _profiled(suite_run["out"], peer)
        assert record["case"] == CASE
        assert record["exit_code"] == 0 and record["output_ok"] and record["error"] is None
        assert (
            suite_run["out"] / "reports" / "tiny" / peer / "run1" / record["prediction"]
        ).is_file()
    # nnU-Net's command really was nnU-Net's (its log speaks for it).
    log = suite_run["out"] / "reports" / "tiny" / "nnunet_notta" / "run1" / "logs" / f"{CASE}.log"
    assert "nnU-Net" in log.read_text()


def test_suite_removes_only_the_staging_it_made(suite_run):
    staging = suite_run["out"] / ".staging"
    # the file the suite found there is kept; each case's own folder is gone
    assert [p.name for p in staging.iterdir()] == ["mine.txt"]
    assert (staging / "mine.txt").read_text() == "not the suite's"


def test_results_table_has_both_peers_and_measured_ratios(suite_run):
    out = suite_run["out"]
    ours, nnunet = _profiled(out, "ours")["metrics"], _profiled(out, "nnunet_notta")["metrics"]
    time_ratio = nnunet["time_s"] / ours["time_s"]
    rss_ratio = nnunet["max_rss_mb"] / ours["max_rss_mb"]
    section = (out / "RESULTS.md").read_text()
    assert "ours (predict.sh)" in section and "nnU-Net --disable_tta" in section
    time_rows = [ln for ln in section.splitlines() if ln.startswith(f"| {CASE} |")]
    # time, peak RSS and RSS area tables, one row each
    assert len(time_rows) == 3
    assert f"{time_ratio:.2f}×" in time_rows[0]
    assert f"{rss_ratio:.2f}×" in time_rows[1]
    summary = json.loads((out / "benchmark.json").read_text())
    assert summary["ratios"]["tiny"]["nnunet_notta"]["time"][CASE] == pytest.approx(time_ratio)
    checks = {c["target"]: c for c in summary["checks"]}
    notta = next(c for t, c in checks.items() if "--disable_tta, whole process" in t)
    assert notta["met"] == (time_ratio >= 2.0)
    assert all(c["met"] is None for t, c in checks.items() if t.startswith("GPU"))
    # The committed file got the same CPU section from the template, GPU left unmeasured.
    committed = suite_run["results_md"].read_text()
    assert section.strip() in committed
    assert "No GPU run yet" in committed


def test_stage_parser_reads_our_real_log(suite_run):
    out = suite_run["out"]
    record = _profiled(out, "ours")
    log_path = out / "reports" / "tiny" / "ours" / "run1" / record["log"]
    times = read_log(log_path, CASE)
    assert times is not None and times.case == CASE
    for stage in ("read", "preprocess", "predict", "forward", "restore", "write"):
        assert stage in times.stages_s
    assert 0 < times.forward_s <= times.stages_s["predict"]
    assert times.n_tiles >= 1 and times.device == "cpu"
    wall_s = record["metrics"]["time_s"]
    b = breakdown(times, wall_s)
    assert times.logged_s < wall_s  # the process does more than its logged stages
    assert sum(b.parts_s.values()) == pytest.approx(wall_s)
    assert b.outside_forward_share == pytest.approx(1 - times.forward_s / wall_s)
    # The breakdown table in RESULTS.md shows the same share.
    section = (out / "RESULTS.md").read_text()
    row = next(ln for ln in section.splitlines() if ln.startswith("| **outside forward**"))
    assert f"{b.outside_forward_share * 100:.0f} %" in row


def test_nnunet_tile_loop_is_read_from_its_real_log(suite_run):
    out = suite_run["out"]
    record = _profiled(out, "nnunet_notta")
    text = (out / "reports" / "tiny" / "nnunet_notta" / "run1" / record["log"]).read_text()
    loop_s = nnunet_loop_s(text)
    assert loop_s is not None and 0 <= loop_s <= record["metrics"]["time_s"] + 1  # 1 s steps
    # our own log has no nnU-Net progress bar
    ours = _profiled(out, "ours")
    assert (
        nnunet_loop_s((out / "reports" / "tiny" / "ours" / "run1" / ours["log"]).read_text())
        is None
    )
    summary = json.loads((out / "benchmark.json").read_text())
    (entry,) = summary["nnunet_tile_loop"]
    assert entry["loop_s"] == loop_s and entry["peer"] == "nnunet_notta"


def test_stage_parser_ignores_a_case_that_never_finished(suite_run):
    out = suite_run["out"]
    text = (out / "reports" / "tiny" / "ours" / "run1" / "logs" / f"{CASE}.log").read_text()
    assert parse_log(text, CASE) is not None
    # A run killed before its write completed logs no "| write" part: no breakdown then.
    cut = re.sub(r" \| write [\d.]+s.*", "", text)
    assert parse_log(cut, CASE) is None
    assert parse_log(text, "FLARE24_other") is None


def test_results_file_keeps_the_other_device_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    update_results_file(path, "gpu", "## GPU run\n\nmeasured on a GPU")
    update_results_file(path, "cpu", "## CPU run\n\nfirst CPU figures")
    update_results_file(path, "cpu", "## CPU run\n\nsecond CPU figures")
    text = path.read_text()
    assert "measured on a GPU" in text and "second CPU figures" in text
    assert "first CPU figures" not in text


def test_runs_are_interleaved_per_case_and_peers_rotate_between_repeats(tmp_path):
    from benchmarks.cases import BenchCase
    from benchmarks.models import BenchModel
    from benchmarks.peers import get_peers
    from benchmarks.suite import schedule

    cases = [
        BenchCase(cid, f"FLARE24_{cid}", (8, 8, 8), (1.0, 1.0, 1.0), tmp_path / f"{cid}.nii.gz")
        for cid in ("small", "0001")
    ]
    models = [BenchModel(n, n, tmp_path, tmp_path, ("all",), 1) for n in ("a", "b")]
    peers = get_peers(["ours", "nnunet_notta", "nnunet_tta"])
    order = schedule(cases, models, peers, repeat=2, plan={"b": ["FLARE24_small"]})
    keys = [(c.case_id, k, m.name, p.name) for c, k, m, p in order]
    # every run of the first case comes before any run of the second
    first_of_second = next(i for i, key in enumerate(keys) if key[0] == "0001")
    assert all(key[0] == "small" for key in keys[:first_of_second])
    # model b runs only its planned case; a runs both, 2 repeats x 3 peers each
    assert {key[0] for key in keys if key[2] == "b"} == {"small"}
    assert len(keys) == (2 + 1) * 2 * 3
    peers_rep1 = [key[3] for key in keys if key[:3] == ("small", 1, "a")]
    peers_rep2 = [key[3] for key in keys if key[:3] == ("small", 2, "a")]
    assert peers_rep2 == peers_rep1[1:] + peers_rep1[:1]


def test_air_table_has_our_logged_tiles_and_the_no_skip_run(suite_run):
    out = suite_run["out"]
    record = _profiled(out, "ours")
    times = read_log(out / "reports" / "tiny" / "ours" / "run1" / record["log"], CASE)
    noskip = _profiled(out, "ours_noskip")
    assert noskip["exit_code"] == 0 and noskip["output_ok"]
    summary = json.loads((out / "benchmark.json").read_text())
    (air,) = [a for a in summary["air"] if a["model"] == "tiny" and a["case"] == CASE]
    assert air["n_tiles"] == times.n_tiles and air["n_skipped"] == times.n_skipped
    assert air["noskip_s"] == pytest.approx(noskip["metrics"]["time_s"])
    assert air["ours_s"] == pytest.approx(record["metrics"]["time_s"])
    assert air["dice_vs_noskip"] == 1.0  # the tiny case is all body: the same mask
    section = (out / "RESULTS.md").read_text()
    assert "### Air tiles skipped" in section and f"| tiny | {CASE} | {times.n_tiles} |" in section
    assert "no-skip / ours" in section


def test_stage_parser_reads_the_air_tiles_skipped():
    line = (
        "[1/1] FLARE24_wide 512x512x16: read 0.10s preprocess 0.20s predict 9.00s forward "
        "8.50s restore 0.30s (578 tiles, cpu) | 301 of 578 air tiles skipped (~9.2 s saved) "
        "| foreground 1.0 ml | write 0.05s | rss 800 MB"
    )
    times = parse_log(line, "FLARE24_wide")
    assert (times.n_tiles, times.n_skipped, times.air_saved_s) == (578, 301, 9.2)
    assert times.device == "cpu" and times.stages_s["forward"] == 8.5
    plain = line.replace("301 of 578 air tiles skipped (~9.2 s saved)", "no air tile skipped")
    assert parse_log(plain, "FLARE24_wide").n_skipped == 0


def test_some_cases_run_only_some_peers(tmp_path):
    from benchmarks.cases import BenchCase
    from benchmarks.models import BenchModel
    from benchmarks.peers import get_peers
    from benchmarks.suite import schedule

    cases = [
        BenchCase(cid, f"FLARE24_{cid}", (8, 8, 8), (1.0, 1.0, 1.0), tmp_path / f"{cid}.nii.gz")
        for cid in ("small", "wide")
    ]
    models = [BenchModel("a", "a", tmp_path, tmp_path, ("all",), 1)]
    peers = get_peers(["ours", "ours_noskip", "nnunet_notta", "nnunet_tta"])
    order = schedule(
        cases, models, peers, 1, peers_by_case={"FLARE24_wide": ("ours", "ours_noskip")}
    )
    by_case = {}
    for case, _, _, peer in order:
        by_case.setdefault(case.case_id, []).append(peer.name)
    assert by_case == {
        "small": ["ours", "ours_noskip", "nnunet_notta", "nnunet_tta"],
        "wide": ["ours", "ours_noskip"],
    }


def test_parameter_count_reads_checkpoints_without_running_them(tiny_model, tmp_path):
    import torch

    from benchmarks.models import count_parameters
    from inference.model import load_model

    checkpoint = tiny_model / "fold_all" / "checkpoint_final.pth"
    net = load_model(tiny_model).networks[0]
    assert count_parameters(checkpoint) == sum(p.numel() for p in net.parameters())
    marker = tmp_path / "payload-ran"
    planted = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.ones(3)}, "note": Payload(marker)}, planted)
    assert count_parameters(planted) is None
    assert not marker.exists()
