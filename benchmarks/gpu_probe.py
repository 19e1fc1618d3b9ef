"""The GPU check's in-process measurements, each run in a fresh process by ``gpu_check``.

``context``: device-level memory (NVML total - free) next to what CUDA shows
(``mem_get_info``) and what torch's allocator holds, at the moments that decide the
budget's fixed part: idle before CUDA exists, after CUDA starts, after the model loads,
after the first float16 tile (cuDNN and lazily loaded kernels arrive here), after the
cache is emptied, after a second ensemble member loads.

``tile``: one tile of the model through the predictor's own sliding window (one tile,
float16 autocast, batch 1), for cudnn.benchmark and channels_last_3d on and off: its time
(CUDA events, median of the timed passes), the first pass (cuDNN's search when
benchmark is on), peak allocated and reserved memory, and the FLOPs of one tile counted
on the meta device.

Each probe is a fresh process so that its figures start from an idle device, and so that
the orchestrator can stop it at its time limit. Without CUDA (``--device cpu``) every step
still runs, on the CPU, and the device figures are None: that is how the tests run it.

Usage: ``python -m benchmarks.gpu_probe context|tile --model DIR [--model DIR2] --json OUT``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

MB = 2**20


def nvml_before_cuda(index: int = 0) -> dict[str, Any]:
    """NVML's total and free of device ``index`` while this process has no CUDA context."""
    from inference.device_memory import read_nvml

    try:
        reading = read_nvml(None, index)
    except RuntimeError as err:
        return {"nvml_error": str(err)}
    return {"nvml_total_mb": reading.total_mb, "nvml_used_mb": reading.used_mb}


def snapshot(moment: str, device: Any, t0: float) -> dict[str, Any]:
    """Device memory now, from NVML, CUDA and torch's allocator (None where not known)."""
    import torch

    record: dict[str, Any] = {"moment": moment, "t_s": round(time.perf_counter() - t0, 3)}
    if device.type != "cuda":
        return record
    from inference.device_memory import CudaMemory

    torch.cuda.synchronize(device)
    reading = CudaMemory(device).read()
    free, total = torch.cuda.mem_get_info(device)
    record.update(
        nvml_source=reading.source,
        nvml_total_mb=reading.total_mb,
        nvml_used_mb=reading.used_mb,
        cuda_total_mb=total / MB,
        cuda_used_mb=(total - free) / MB,
        reserved_mb=torch.cuda.memory_reserved(device) / MB,
        allocated_mb=torch.cuda.memory_allocated(device) / MB,
        max_allocated_mb=torch.cuda.max_memory_allocated(device) / MB,
        max_reserved_mb=torch.cuda.max_memory_reserved(device) / MB,
    )
    if reading.note:
        record["nvml_note"] = reading.note
    return record


def _one_tile(model: Any, device: Any) -> tuple[Any, Any]:
    """A random image exactly one tile large (float16 on CUDA, as the predictor keeps it)."""
    import torch

    from inference.sliding_window import output_channels

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((1, *model.patch_size), generator=generator).to(device, dtype)
    acc = torch.zeros((output_channels(model.num_classes), *model.patch_size), device=device)
    return image, acc


def run_tile(model: Any, device: Any, image: Any, acc: Any) -> None:
    """One tile through the predictor's sliding window (float16 autocast on CUDA)."""
    from inference.sliding_window import predict_sliding_window

    acc.zero_()
    predict_sliding_window(
        model.networks,
        image,
        model.patch_size,
        model.num_classes,
        acc,
        compute_device=device,
        autocast=device.type == "cuda",
    )


def probe_context(model_dirs: list[Path], device_name: str, index: int = 0) -> dict[str, Any]:
    """The context probe (see the module docstring)."""
    t0 = time.perf_counter()
    idle = {"moment": "idle, before CUDA", "t_s": 0.0}
    if device_name == "cuda":
        idle.update(nvml_before_cuda(index))
    import torch

    from inference.device_memory import CONTEXT_MARGIN_MB, plan_allocator_cap
    from inference.model import load_model

    device = torch.device(device_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        torch.cuda.init()
        torch.zeros(1, device=device)
    moments = [idle, snapshot("after CUDA init", device, t0)]
    model = load_model(model_dirs[0]).to(device)
    moments.append(snapshot("after the model loads", device, t0))
    after_load = moments[-1]
    image, acc = _one_tile(model, device)
    run_tile(model, device, image, acc)
    moments.append(snapshot("after the first float16 tile", device, t0))
    del image, acc
    if device.type == "cuda":
        torch.cuda.empty_cache()
    moments.append(snapshot("after empty_cache", device, t0))
    for extra in model_dirs[1:]:
        load_model(extra).to(device)
        moments.append(snapshot(f"after loading {extra.name}", device, t0))
    result: dict[str, Any] = {"moments": moments, "device": _device_facts(device)}
    if "nvml_used_mb" in after_load:
        cap = plan_allocator_cap(
            4096.0,
            after_load["nvml_used_mb"],
            after_load["reserved_mb"],
            after_load["cuda_total_mb"],
            CONTEXT_MARGIN_MB,
            after_load["nvml_source"],
        )
        result["cap_4096"] = {"cap_mb": cap.cap_mb, "describe": cap.describe()}
    return result


def count_tile_flops(model: Any) -> float | None:
    """FLOPs of one forward pass on one tile, counted on the meta device (no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from inference.model import build_network, resolve_configuration

    plans = json.loads((model.folder / "plans.json").read_text(encoding="utf-8"))
    config = resolve_configuration(plans, model.configuration)
    net = build_network(config, 1, model.num_classes)
    x = torch.empty((1, 1, *model.patch_size), device="meta")
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            net(x)
    except (RuntimeError, NotImplementedError):
        return None
    return float(counter.get_total_flops())


def _time_passes(model: Any, device: Any, image: Any, acc: Any, n: int) -> list[float]:
    """Milliseconds of ``n`` tiles, each timed alone (CUDA events, or a clock on the CPU)."""
    import torch

    times = []
    for _ in range(n):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_tile(model, device, image, acc)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            run_tile(model, device, image, acc)
            times.append((time.perf_counter() - t) * 1000)
    return times


def probe_tile(
    model_dir: Path, device_name: str, warmup: int = 3, repeats: int = 10
) -> dict[str, Any]:
    """The tile probe (see the module docstring)."""
    import torch

    from inference.model import load_model

    device = torch.device(device_name)
    on_cuda = device.type == "cuda"
    model = load_model(model_dir).to(device)
    image, acc = _one_tile(model, device)
    rows = []
    for channels_last in (False, True):
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        model.networks = [net.to(memory_format=fmt) for net in model.networks]
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            if on_cuda:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            first_ms = _time_passes(model, device, image, acc, 1)[0]
            first_peak = torch.cuda.max_memory_reserved(device) / MB if on_cuda else None
            _time_passes(model, device, image, acc, warmup)
            base = None
            if on_cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device) / MB
            times = _time_passes(model, device, image, acc, repeats)
            row: dict[str, Any] = {
                "cudnn_benchmark": benchmark,
                "channels_last_3d": channels_last,
                "first_ms": first_ms,
                "median_ms": statistics.median(times),
                "min_ms": min(times),
                "repeats": repeats,
            }
            if on_cuda:
                peak = torch.cuda.max_memory_allocated(device) / MB
                row.update(
                    peak_allocated_mb=peak,
                    peak_reserved_mb=torch.cuda.max_memory_reserved(device) / MB,
                    first_pass_peak_reserved_mb=first_peak,
                    activations_mb=peak - base,
                    nvml_used_mb=snapshot("tile", device, time.perf_counter())["nvml_used_mb"],
                )
            rows.append(row)
    torch.backends.cudnn.benchmark = False
    flops = count_tile_flops(model)
    return {
        "model": str(model_dir),
        "patch_size": list(model.patch_size),
        "n_parameters": model.n_parameters,
        "tile_flops": flops,
        "rows": rows,
        "device": _device_facts(device),
    }


def _device_facts(device: Any) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            multiprocessors=props.multi_processor_count,
        )
    return facts


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for --help)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_probe",
        description="One measurement of the GPU check in a fresh process (see its docstring).",
    )
    p.add_argument("probe", choices=["context", "tile"])
    p.add_argument("--model", type=Path, action="append", required=True, help="model folder")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--json", type=Path, required=True, help="where the figures go")
    p.add_argument("--warmup", type=int, default=3, help="tile: untimed passes")
    p.add_argument("--repeats", type=int, default=10, help="tile: timed passes")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one probe; exit 0 with the JSON written, 1 with a one-line reason."""
    args = build_parser().parse_args(argv)
    try:
        if args.probe == "context":
            result = probe_context(args.model, args.device)
        else:
            result = probe_tile(args.model[0], args.device, args.warmup, args.repeats)
    except Exception as err:  # one line for the orchestrator's log; the traceback is noise
        print(f"error: {args.probe} probe: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
