"""The network's own forward against the lean one, one tile, in one process.

``inference/forward.py`` frees skips and concatenations early to lower the activation
peak; this times both on the same tile (alternating, after one warm-up each) to show the
lower peak costs no speed. Random weights: the time does not depend on their values.

    python -m benchmarks.bench_forward                         # compact network, CPU
    python -m benchmarks.bench_forward --model-dir models/demo --repeat 5

The compact network's folder is written by ``python -m benchmarks`` (bench_out/models/);
any nnU-Net model folder works.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Time ``net(x)`` and ``lean_forward(net, x)``; print seconds per tile."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_forward", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model-dir", type=Path, default=Path("bench_out/models/compact"))
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not args.model_dir.is_dir():
        print(
            f"error: no model folder {args.model_dir} (python -m benchmarks writes it)",
            file=sys.stderr,
        )
        return 2

    import torch

    from inference.forward import lean_forward
    from inference.model import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model_dir)
    net = model.networks[0].eval()
    x = torch.randn(1, 1, *model.patch_size)
    ways = {"own": lambda: net(x), "lean": lambda: lean_forward(net, x)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    with torch.inference_mode():
        for run in ways.values():
            run()
        for _ in range(args.repeat):
            for name, run in ways.items():
                t = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - t)
    print(f"{args.model_dir} patch {model.patch_size}, {args.threads} threads, cpu")
    for name, values in seconds.items():
        runs = " ".join(f"{s:.2f}" for s in values)
        print(f"{name:>4}: median {statistics.median(values):.2f} s per tile ({runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
