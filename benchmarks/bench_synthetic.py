"""Time the synthetic generator on the largest Table 4 case (512x512x554, 1.25 mm slices).

Generates the case and writes its image and label with gzip level 1, as
``python -m synthetic table4`` does, and prints the seconds of each step. No assertion:
the figure depends on the machine (target: well under 15 s on 2 CPU cores).

Usage: ``python -m benchmarks.bench_synthetic [--case 0029] [--repeat 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from inference.cases import LABEL_SUFFIX
from inference.nifti import write_image
from synthetic import generate_case, table4_cases, write_case
from synthetic.dataset import TABLE4_LESIONS, case_seed


def time_case(case_id: str, seed: int, out_dir: Path) -> dict:
    """Generate and write one Table 4 case; returns the seconds per step and the file sizes."""
    name, shape, spacing = next(c for c in table4_cases() if c[0].endswith(case_id))
    t0 = time.perf_counter()
    case = generate_case(
        case_seed(seed, int(case_id)),
        shape,
        spacing_zyx_mm=spacing,
        n_lesions=TABLE4_LESIONS,
        oblique=False,
    )
    t1 = time.perf_counter()
    paths = write_case(case, name, out_dir / "images")
    t2 = time.perf_counter()
    write_image(out_dir / f"{name}{LABEL_SUFFIX}", case.label, case.geometry)
    t3 = time.perf_counter()
    return {
        "case": name,
        "shape_zyx": list(shape),
        "spacing_zyx_mm": list(spacing),
        "generate_s": round(t1 - t0, 3),
        "write_image_s": round(t2 - t1, 3),
        "write_label_s": round(t3 - t2, 3),
        "total_s": round(t3 - t0, 3),
        "image_mb": round(paths["image"].stat().st_size / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_synthetic", description=__doc__
    )
    parser.add_argument(
        "--case", default="0029", help="Table 4 case id (default: 0029, 554 slices)"
    )
    parser.add_argument("--seed", type=int, default=0, help="folder seed (default: 0)")
    parser.add_argument("--repeat", type=int, default=1, help="runs to time (default: 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not any(name.endswith(f"_{args.case}") for name, _, _ in table4_cases()):
        print(f"bench_synthetic: unknown Table 4 case {args.case}", file=sys.stderr)
        return 1
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_synthetic_") as tmp:
        for _ in range(args.repeat):
            run = time_case(args.case, args.seed, Path(tmp))
            runs.append(run)
            print(
                f"{run['case']} {tuple(run['shape_zyx'])} @ {tuple(run['spacing_zyx_mm'])} mm: "
                f"generate {run['generate_s']:.2f} s + write image {run['write_image_s']:.2f} s "
                f"({run['image_mb']} MB) + write label {run['write_label_s']:.2f} s "
                f"= {run['total_s']:.2f} s"
            )
    best = min(r["total_s"] for r in runs)
    print(f"best of {len(runs)}: {best:.2f} s ({platform.processor() or platform.machine()})")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "best_total_s": best}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
