"""Command line: write synthetic FLARE-like CT folders.

Examples::

    python -m synthetic flare -o work/flare --cases 12 --shape 48 96 96
    python -m synthetic test -o work/test --cases 4 --seed 1
    python -m synthetic table4 -o bench_out/table4 --only 0001 0029 --shape 32 128 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from synthetic.dataset import (
    DEFAULT_SHAPE_ZYX,
    SMALL_SHAPE_ZYX,
    TABLE4_SLICES,
    write_flare_folder,
    write_table4_folder,
    write_test_folder,
)


def _shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape", nargs=3, type=int, metavar=("Z", "Y", "X"), default=list(DEFAULT_SHAPE_ZYX),
        help="array shape of every case (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--spacing", nargs=3, type=float, metavar=("Z", "Y", "X"), default=None,
        help="voxel spacing in mm (default: random realistic, in-plane 0.6-0.9, z 0.8-5)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m synthetic`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m synthetic",
        description="Write deterministic FLARE-like synthetic CT cases (int16 HU images, "
        "uint8 lesion labels, gzip-1 NIfTI).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    flare = sub.add_parser(
        "flare",
        help="FLARE24-style training folder",
        description="imagesTr/ + labelsTr/ (full and partial cases, labels as shipped), "
        "unlabeledTr/, labelsTr_complete/ (complete ground truth), manifest.json.",
    )
    flare.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    flare.add_argument("--cases", type=int, default=12, help="number of cases (default: 12)")
    flare.add_argument("--seed", type=int, default=0, help="folder seed (default: 0)")
    flare.add_argument(
        "--kinds", nargs="+", choices=["full", "partial", "unlabeled"],
        default=["full", "partial", "unlabeled"],
        help="kinds to generate (default shares: full 1/2, partial 1/4, unlabeled 1/4)",
    )  # fmt: skip
    flare.add_argument(
        "--fractions", nargs="+", type=float, default=None,
        help="share of each kind given in --kinds, in the same order",
    )  # fmt: skip
    _shape(flare)

    test = sub.add_parser(
        "test",
        help="held-out folder with complete labels",
        description="images/<case>_0000.nii.gz, labels/<case>.nii.gz (complete), manifest.json.",
    )
    test.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    test.add_argument("--cases", type=int, default=4, help="number of cases (default: 4)")
    test.add_argument("--seed", type=int, default=1, help="folder seed (default: 1)")
    _shape(test)

    table4 = sub.add_parser(
        "table4",
        help="the 8 image sizes of the paper's Table 4 (512x512 x 55..554 slices)",
        description="images/ + labels/ + manifest.json; in-plane 0.8 mm, z 5.0 mm for <=100 "
        "slices, 2.5 mm for 150-215, 1.25 mm for >=334 (FLARE24.md).",
    )
    table4.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    table4.add_argument("--seed", type=int, default=0, help="folder seed (default: 0)")
    table4.add_argument(
        "--only", nargs="+", metavar="ID", choices=sorted(TABLE4_SLICES),
        help="write only these case ids (e.g. 0001 0029)",
    )  # fmt: skip
    table4.add_argument(
        "--shape", nargs=3, type=int, metavar=("Z", "Y", "X"), default=list(SMALL_SHAPE_ZYX),
        help="shape of the extra small smoke case FLARE24_small (default: %(default)s)",
    )  # fmt: skip
    table4.add_argument("--no-small", action="store_true", help="do not write the small smoke case")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "flare":
            manifest = write_flare_folder(
                args.out, args.cases, seed=args.seed, shape_zyx=tuple(args.shape),
                kinds=tuple(args.kinds), fractions=args.fractions,
                spacing_zyx_mm=tuple(args.spacing) if args.spacing else None, progress=True,
            )  # fmt: skip
            kinds = ", ".join(f"{n} {k}" for k, n in manifest["kinds"].items())
            where = "imagesTr/, labelsTr/, unlabeledTr/, labelsTr_complete/"
        elif args.command == "test":
            manifest = write_test_folder(
                args.out, args.cases, seed=args.seed, shape_zyx=tuple(args.shape),
                spacing_zyx_mm=tuple(args.spacing) if args.spacing else None, progress=True,
            )  # fmt: skip
            kinds, where = "complete labels", "images/, labels/"
        else:
            manifest = write_table4_folder(
                args.out, seed=args.seed, only=args.only,
                small_shape_zyx=None if args.no_small else tuple(args.shape), progress=True,
            )  # fmt: skip
            kinds, where = "complete labels", "images/, labels/"
    except (ValueError, RuntimeError, OSError) as err:
        print(f"synthetic: {err}", file=sys.stderr)
        return 1
    n_lesions = sum(c["n_lesions"] for c in manifest["cases"])
    print(
        f"wrote {manifest['n_cases']} cases ({kinds}; {n_lesions} lesions) to {args.out}: "
        f"{where}, manifest.json in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
