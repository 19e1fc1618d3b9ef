"""What verifying the gzip data of inputs and outputs costs, on a realistic CT case.

``inference.nifti.read_image`` decompresses every ``.nii.gz`` a second time to verify its
CRC-32 and length (SimpleITK reads a damaged or cut file without a word), on a second
thread while SimpleITK decompresses it; ``write_image`` checks every written mask's gzip
trailer against the CRC-32 of what it meant to write before renaming it into place (ITK's
writer does not report a full disk). This prints,
per step, the median wall time of SimpleITK alone and with the check, and the check's
own wall and CPU time:

* read: the CT image (int16) with ``read_image`` vs. ``sitk.ReadImage``; also the check
  run after SimpleITK instead of beside it;
* write: the label map (uint8, gzip level 1) with ``write_image`` vs. ``sitk.WriteImage``
  into a temporary file; the trailer check alone, and a full decompression for comparison.

The case is a synthetic Table 4 case (default 0019: 512x512x215 voxels at 2.5 mm).
No assertion: the figures depend on the machine and on its load.

Usage: ``python -m benchmarks.bench_gzip_check [--case 0019] [--repeat 5] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk

from inference.nifti import (
    _check_payload,
    _trailer_matches,
    read_header,
    read_image,
    write_image,
)
from synthetic import generate_case, table4_cases, write_case
from synthetic.dataset import TABLE4_LESIONS, case_seed


def _timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    """Median wall and CPU seconds (this process, all threads) of ``fn`` over ``repeat`` runs."""
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    median = statistics.median
    return {"wall_s": round(median(walls), 3), "cpu_s": round(median(cpus), 3)}


def measure(case_id: str, repeat: int, work: Path) -> dict[str, object]:
    """Write the case once, then time reading and writing with and without the checks."""
    name, shape, spacing = next(c for c in table4_cases() if c[0].endswith(case_id))
    seed = case_seed(0, int(case_id))
    case = generate_case(seed, shape, spacing_zyx_mm=spacing, n_lesions=TABLE4_LESIONS)
    image_path = write_case(case, name, work / "images")["image"]
    header = read_header(image_path)
    label_image = case.geometry.apply_to(sitk.GetImageFromArray(case.label))
    plain = work / "plain.nii.gz"
    sitk.WriteImage(label_image, str(plain), True, 1)
    read_image(image_path)  # warm the page cache

    def sequential() -> None:
        sitk.ReadImage(str(image_path))
        _check_payload(image_path, header)

    return {
        "case": name,
        "shape_zyx": list(shape),
        "image_mb": round(image_path.stat().st_size / 1e6, 1),
        "image_decompressed_mb": round((header.vox_offset + header.data_bytes) / 1e6, 1),
        "label_mb": round(plain.stat().st_size / 1e6, 2),
        "read_simpleitk": _timed(lambda: sitk.ReadImage(str(image_path)), repeat),
        "read_image_checked": _timed(lambda: read_image(image_path), repeat),
        "read_check_alone": _timed(lambda: _check_payload(image_path, header), repeat),
        "read_check_after_simpleitk": _timed(sequential, repeat),
        "write_simpleitk": _timed(
            lambda: sitk.WriteImage(label_image, str(plain), True, 1), repeat
        ),
        "write_image_verified": _timed(
            lambda: write_image(work / "mask.nii.gz", case.label, case.geometry), repeat
        ),
        "write_check_trailer": _timed(
            lambda: _trailer_matches(plain, read_header(plain), case.label), repeat
        ),
        "write_check_full": _timed(lambda: _check_payload(plain, read_header(plain)), repeat),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="0019", help="Table 4 case id (default 0019)")
    p.add_argument("--repeat", type=int, default=5, help="runs per step (median)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gzip-check-") as tmp:
        figures = measure(args.case, args.repeat, Path(tmp))
    figures["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
