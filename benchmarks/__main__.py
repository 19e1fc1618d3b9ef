"""``python -m benchmarks``: our predictor against nnU-Net on the paper's Table 4 sizes.

Generates the cases and random-weight models it needs (cached), runs every case x model x
peer as a whole process under the profiler, and writes benchmarks/RESULTS.md (the section
of the device used), OUT/RESULTS.md, OUT/benchmark.json and the raw profiler reports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from benchmarks.cases import (
    CASE_IDS,
    DEFAULT_CASE_IDS,
    SMALL,
    SMALL_SHAPE_ZYX,
    TABLE4_IDS,
    WIDE,
    ensure_cases,
)
from benchmarks.models import (
    DEFAULT_MODEL_NAMES,
    MODEL_NAMES,
    BenchModel,
    ModelUnavailable,
    folder_model,
    get_model,
)
from benchmarks.peers import (
    NNUNET_NOTTA,
    NNUNET_PREDICT,
    OUR_PEERS,
    OURS,
    OURS_NOSKIP,
    PEER_NAMES,
    find_program,
    get_peers,
)
from benchmarks.results import RESULTS_MD, write_results
from benchmarks.suite import SuiteSettings, interrupt_on_sigterm, run_suite

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
REPO = Path(__file__).resolve().parents[1]
#: Cases each model runs by default (models not named here run DEFAULT_CASE_IDS). The CPU
#: demo model's patch is tiny, so a 512x512 case takes thousands of tiles; nnU-Net's TTA
#: multiplies that by 8, far beyond a 15-minute default on 2 cores. The demo model runs
#: the wide case, where its small patch leaves many tiles of pure air to skip (the
#: compact network's 3x3 tiles per slice all touch the body there).
DEFAULT_CASES_BY_MODEL = {"demo": (SMALL, WIDE), "compact": (SMALL, "0001")}
#: Peers each case runs by default (cases not named here run every peer): nnU-Net with
#: TTA would spend most of the default run on the wide case's hundreds of tiles.
DEFAULT_PEERS_BY_CASE = {WIDE: (OURS, OURS_NOSKIP, NNUNET_NOTTA)}
GPU_COMMAND = (
    "python -m benchmarks --device cuda --cases all --models flare ensemble compact demo "
    "--peers ours nnunet_notta nnunet_tta --repeat 3 --timeout-s 3600"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for --help)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Time and memory of our predictor (sh predict.sh, with and without --no-skip-air) "
            "against nnUNetv2_predict_from_modelfolder, default (TTA) and --disable_tta, on "
            "synthetic cases of the method paper's Table 4 sizes and a wide field of view; "
            "each run is one whole process per case under the profiler. Defaults are sized "
            "for a 2-core CPU (about 20 min)."
        ),
        epilog=(
            "Quick CPU check:\n"
            "  python -m benchmarks --cases small --models compact --peers ours nnunet_notta\n"
            f"Full matrix on a GPU:\n  {GPU_COMMAND}\n"
            f"Cases: small (32x128x128 unless --small-shape), wide (a 256 mm body in a 410 mm "
            f"field of view, 512x512x16) and Table 4 ids {' '.join(TABLE4_IDS)} (512x512 x "
            "55..554 slices), or all."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cases",
        nargs="+",
        default=None,
        metavar="ID",
        help=f"case ids for every model: {', '.join(CASE_IDS)} or all (default: demo on "
        f"{' '.join(DEFAULT_CASES_BY_MODEL['demo'])}, compact on "
        f"{' '.join(DEFAULT_CASES_BY_MODEL['compact'])}, other models on "
        f"{' '.join(DEFAULT_CASE_IDS)}; nnunet_tta not on {WIDE})",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"models: {', '.join(MODEL_NAMES)} (default: {' '.join(DEFAULT_MODEL_NAMES)}; "
        "by default demo is skipped with a note when models/demo is not built)",
    )
    p.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also benchmark this nnU-Net model folder under NAME (repeatable)",
    )
    p.add_argument(
        "--peers",
        nargs="+",
        default=list(PEER_NAMES),
        choices=PEER_NAMES,
        metavar="PEER",
        help=f"peers: {', '.join(PEER_NAMES)} (default: all)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    p.add_argument("--repeat", type=int, default=1, help="runs per case, model and peer")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        default=REPO / "bench_out",
        help="output folder (default: bench_out)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="case cache (default: OUT/cases); random-weight models go to OUT/models",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic cases")
    p.add_argument(
        "--small-shape",
        nargs=3,
        type=int,
        default=list(SMALL_SHAPE_ZYX),
        metavar=("Z", "Y", "X"),
        help="shape of the small case (default: %(default)s)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=RESULTS_MD,
        help="results file whose CPU or GPU section is rewritten (default: benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--no-results-file", action="store_true", help="leave benchmarks/RESULTS.md alone"
    )
    p.add_argument("--timeout-s", type=float, default=None, help="kill a run after this long")
    p.add_argument("--interval-s", type=float, default=0.1, help="profiler sampling interval")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots in the reports")
    p.add_argument("--no-warm-up", action="store_true", help="skip the unmeasured warm-up")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _models(args: argparse.Namespace, models_dir: Path) -> tuple[list[BenchModel], list[str]]:
    """The models asked for, and notes on those skipped (only a default demo is skipped)."""
    models, skipped = [], []
    for name in dict.fromkeys(args.models or DEFAULT_MODEL_NAMES):
        try:
            models.append(get_model(name, models_dir))
        except ModelUnavailable as err:
            if name == "demo" and args.models is None:
                skipped.append(f"model demo: {err}")
                print(f"warning: skipping {err}", file=sys.stderr)
            else:
                raise
    for item in args.model_dir:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model-dir wants NAME=PATH, got {item!r}")
        models.append(folder_model(name, Path(path)))
    return models, skipped


def _gpu_note(device: str) -> str | None:
    if device != "cuda":
        return None
    from profiling.sources import open_gpu_source

    source = open_gpu_source(0)
    try:
        info = source.describe()
    finally:
        source.close()
    return None if info.get("available") else f"NVML: {info.get('reason')}"


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.repeat < 1:
        return _fail(f"--repeat must be at least 1, got {args.repeat}")
    if args.cases is None:
        case_ids, plan_ids = list(DEFAULT_CASE_IDS), DEFAULT_CASES_BY_MODEL
        peer_ids = DEFAULT_PEERS_BY_CASE
    else:
        case_ids, plan_ids = (list(CASE_IDS) if "all" in args.cases else args.cases), {}
        peer_ids = {}
    out: Path = args.out.resolve()
    try:
        if any(p not in OUR_PEERS for p in args.peers):
            find_program(NNUNET_PREDICT)
        peers = get_peers(list(dict.fromkeys(args.peers)))
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return _fail("--device cuda: torch sees no CUDA device on this machine")
        out.mkdir(parents=True, exist_ok=True)
        cases = ensure_cases(
            args.cache or out / "cases",
            case_ids,
            seed=args.seed,
            small_shape_zyx=args.small_shape,
            progress=not args.quiet,
        )
        models, skipped = _models(args, out / "models")
    except (ValueError, FileNotFoundError, ModelUnavailable, OSError) as err:
        return _fail(str(err))
    if not models:
        return _fail("no model to benchmark")
    settings = SuiteSettings(
        device=args.device,
        repeat=args.repeat,
        interval_s=args.interval_s,
        timeout_s=args.timeout_s,
        plots=not args.no_plots,
        warm_up=not args.no_warm_up,
    )
    by_id = {c.case_id: c.name for c in cases}
    plan = {m: [by_id[i] for i in ids if i in by_id] for m, ids in plan_ids.items()}
    peers_by_case = {by_id[i]: p for i, p in peer_ids.items() if i in by_id}
    # Each case stages into a folder of its own below .staging (profiling.staging); the
    # folder itself is removed only when this run made it and nothing else is in it.
    made_staging = not os.path.lexists(out / ".staging")
    with interrupt_on_sigterm():
        suite = run_suite(
            cases,
            models,
            peers,
            out,
            settings,
            argv=argv,
            progress=not args.quiet,
            plan=plan,
            peers_by_case=peers_by_case,
        )
    if made_staging:
        with contextlib.suppress(OSError):
            (out / ".staging").rmdir()
    suite.skipped.extend(skipped)
    results_md = None if args.no_results_file else args.results
    analysis, _ = write_results(suite, results_md, _gpu_note(args.device))
    for check in analysis.checks:
        status = {True: "met", False: "MISSED", None: "not measured"}[check.met]
        print(f"{status:>12}  {check.model}: {check.target}: {check.measured}", file=sys.stderr)
    where = f"{results_md} and " if results_md else ""
    print(
        f"results: {where}{out / 'RESULTS.md'}; {len(suite.runs)} run(s), {suite.n_failed} failed",
        file=sys.stderr,
    )
    if suite.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_RUN_FAILED if suite.n_failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
