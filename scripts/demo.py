"""The README's main job: synthetic CT cases -> predict.sh with the demo model -> results.

``python -m scripts.demo --out demo_out`` (what ``make demo`` runs):

1. writes a few held-out synthetic FLARE-like cases with complete ground truth;
2. runs ``sh predict.sh`` on them one case at a time through the profiler, exactly as the
   organizers run the container (``INPUT_DIR`` holding one case);
3. prints per-case time and memory, the lesions found (position, volume, hit or false
   positive) and DSC / NSD, and draws one slice with the prediction over the CT.

Everything lands in the output folder: ``cases/``, ``profile/`` (the profiler's report,
predictions included), ``overlay.png`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Finding:
    """One connected component of a predicted mask.

    Attributes:
        center_mm: physical position of its centroid (x, y, z in the image's world frame).
        volume_ml: its volume.
        hit: whether it overlaps a ground-truth lesion.
    """

    center_mm: tuple[float, float, float]
    volume_ml: float
    hit: bool


def findings(pred: np.ndarray, gt: np.ndarray, geometry) -> list[Finding]:
    """Connected components (26-connected) of ``pred`` with position, volume and hit flag."""
    from scipy import ndimage

    labels, n = ndimage.label(pred, structure=np.ones((3, 3, 3), bool))
    voxel_ml = float(np.prod(geometry.spacing_xyz_mm)) / 1000.0
    direction = np.asarray(geometry.direction).reshape(3, 3)
    spacing = np.asarray(geometry.spacing_xyz_mm)
    origin = np.asarray(geometry.origin_xyz_mm)
    out = []
    for index, zyx in enumerate(ndimage.center_of_mass(pred, labels, range(1, n + 1)), start=1):
        component = labels == index
        xyz = np.asarray(zyx[::-1])
        world = origin + direction @ (spacing * xyz)
        out.append(
            Finding(
                tuple(round(float(v), 1) for v in world),
                float(component.sum()) * voxel_ml,
                bool(gt[component].any()),
            )
        )
    return sorted(out, key=lambda f: -f.volume_ml)


def overlay_png(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, path: Path, title: str) -> int:
    """Draw the axial slice with the most predicted lesion: CT, ground truth, prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    area = pred.sum(axis=(1, 2)) if pred.any() else gt.sum(axis=(1, 2))
    z = int(np.argmax(area)) if area.any() else image.shape[0] // 2
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    for ax, show_pred in zip(axes, (False, True), strict=True):
        ax.imshow(image[z], cmap="gray", vmin=-160, vmax=240, interpolation="nearest")
        if show_pred and pred[z].any():
            ax.imshow(np.ma.masked_where(~pred[z], pred[z]), cmap="autumn", alpha=0.55)
        if gt[z].any():
            ax.contour(gt[z], levels=[0.5], colors="lime", linewidths=1.2)
        ax.set_axis_off()
        ax.set_title("CT + ground truth (green)" if not show_pred else "prediction (red)")
    fig.suptitle(f"{title}, slice z={z}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return z


def reported_accuracy(model: Path) -> str:
    """The held-out accuracy recorded in the model's manifest.json, as one line."""
    import json

    try:
        heldout = json.loads((model / "manifest.json").read_text())["demo"]["heldout"]
        return (
            f"The model's recorded accuracy: mean DSC {heldout['mean_dsc']:.3f}, NSD "
            f"{heldout['mean_nsd_2mm']:.3f} over {heldout['n_cases']} held-out cases "
            f"(seed {heldout['seed']}; manifest.json)."
        )
    except (OSError, KeyError, ValueError, TypeError):
        return "No held-out accuracy recorded in the model's manifest.json."


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run a command from the repository root, streaming its output; its exit status."""
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=REPO / "demo_out", help="output folder")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--cases", type=int, default=4, help="number of synthetic cases")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(48, 96, 96),
        metavar=("Z", "Y", "X"),
        help="array shape (default: the demo model's training shape)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1000,
        help="seed of the synthetic cases (default: the demo model's held-out seed, so the "
        "cases are the first of the 20 its accuracy is reported on)",
    )
    args = parser.parse_args(argv)

    if not (args.model / "plans.json").is_file():
        print(f"error: no model in {args.model}; build it with `make demo-model`", file=sys.stderr)
        return 2
    import synthetic
    from evaluation.metrics import flare_scores
    from inference.nifti import read_image

    out = args.out.resolve()
    cases_dir, profile_dir = out / "cases", out / "profile"
    print(f"1/3 writing {args.cases} synthetic CT cases {tuple(args.shape)} to {cases_dir}")
    synthetic.write_test_folder(cases_dir, args.cases, seed=args.seed, shape_zyx=tuple(args.shape))

    print("2/3 predict.sh, one case at a time, under the profiler")
    # predict.sh runs $PYTHON (default python3, the container's); here it must be this
    # interpreter, the one with the requirements installed (e.g. .venv/bin/python).
    env = dict(os.environ, MODEL_DIR=str(args.model.resolve()))
    env.setdefault("PYTHON", sys.executable)
    status = run(
        [
            sys.executable,
            "-m",
            "profiling",
            "-i",
            str(cases_dir / "images"),
            "-o",
            str(profile_dir),
            "--",
            "sh",
            "predict.sh",
        ],
        env,
    )
    if not (profile_dir / "results.csv").is_file():
        print(f"error: the profiler wrote no report (exit status {status})", file=sys.stderr)
        return 1

    print("3/3 results")
    with open(profile_dir / "results.csv", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    lines = [
        "| Case | Size | Time (s) | Max RSS (MB) | Max GPU (MB) | Lesions (GT) | Found | "
        "False pos. | DSC | NSD |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    detail, best, failed, dscs = [], None, [], []
    for name, row in sorted(rows.items()):
        image, geometry = read_image(cases_dir / "images" / f"{name}_0000.nii.gz")
        gt = read_image(cases_dir / "labels" / f"{name}.nii.gz")[0] > 0
        pred_path = profile_dir / "predictions" / f"{name}.nii.gz"
        if not pred_path.is_file():
            lines.append(f"| {name} | | failed: {row.get('error', '')} |||||||")
            failed.append(name)
            continue
        pred = read_image(pred_path)[0] > 0
        found = findings(pred, gt, geometry)
        from scipy import ndimage

        n_gt = ndimage.label(gt, structure=np.ones((3, 3, 3), bool))[1]
        scores = flare_scores(gt, pred, geometry.spacing_zyx_mm)
        dscs.append(scores.dsc)
        size = "x".join(str(s) for s in geometry.size_xyz)
        hits = sum(f.hit for f in found)
        lines.append(
            f"| {name} | {size} | {float(row['time_s']):.1f} | {float(row['max_rss_mb']):.0f} | "
            f"{row['max_gpu_mb']} | {n_gt} | {hits} | {len(found) - hits} | "
            f"{scores.dsc:.3f} | {scores.nsd:.3f} |"
        )
        for f in found:
            tag = "lesion" if f.hit else "false positive"
            detail.append(f"- {name}: {tag} at {f.center_mm} mm, {f.volume_ml:.2f} ml")
        if found and (best is None or found[0].volume_ml > best[0]):
            best = (found[0].volume_ml, name, image, gt, pred)
    if dscs:
        lines += ["", f"Mean DSC over these {len(dscs)} case(s): {np.mean(dscs):.3f}"]
        lines += [reported_accuracy(args.model)]
    report = "\n".join(["# Demo results", "", *lines, "", "Lesions found:", *detail])
    if best is not None:
        z = overlay_png(best[2], best[3], best[4], out / "overlay.png", best[1])
        report += f"\n\nOverlay: overlay.png ({best[1]}, axial slice {z})"
    (out / "summary.md").write_text(report + "\n")
    print(report)
    print(f"\nreport folder: {out}  (profile/summary.md, profile/plots/, overlay.png)")
    if failed:
        print(f"error: {len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
