"""The device-memory budget as the organizers count it: NVML's total - free.

The challenge reads device-level used memory through NVML (``nvidia-smi``): total - free
of the whole framebuffer. That is more than the CUDA runtime shows. ``cudaMemGetInfo``
(``torch.cuda.mem_get_info``) reports a smaller *total*, without the memory the driver
reserves for itself (about 300 MB on a 24 GB card, more on larger ones), so a budget
computed from it overshoots by exactly that reservation. And the caching allocator's hard
limit (``torch.cuda.set_per_process_memory_fraction``) only bounds what the allocator
reserves, not the CUDA context, the driver's reservation or other processes.

So the cap is planned in two steps, like :mod:`inference.budget`:

1. :func:`plan_allocator_cap`, a pure function: everything NVML counts that the caching
   allocator does not hold (context, driver reservation, other processes) is
   ``NVML used - allocator reserved``; the allocator may reserve the budget minus that and
   minus a margin for the context to grow later (cuDNN and lazily loaded kernels at the
   first convolution). The fraction handed to torch is taken of *torch's* total
   (``mem_get_info``), because that is what torch multiplies it with.
2. :class:`CudaMemory`, the thin caller: reads NVML (nvidia-ml-py, imported lazily:
   only a CUDA run needs it), reads torch's figures, applies the cap, and empties the
   allocator's cache between steps (:meth:`CudaMemory.release`). Without NVML it falls
   back to ``mem_get_info`` plus an assumed driver reservation, and says so.

Everything GPU-specific is reached through two parameters (``nvml``, ``cuda``), so the
arithmetic and its wiring are tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Protocol

MB = 2**20
#: Device memory left for the CUDA context to grow after the cap is set: cuDNN/cuBLAS
#: handles and lazily loaded kernels arrive with the first forward pass, outside the
#: caching allocator. benchmarks/gpu_check.py measures the real growth.
CONTEXT_MARGIN_MB = 384.0
#: Driver reservation assumed when NVML cannot be read (NVML total - CUDA total is about
#: 300 MB on a 24 GB card and grows with the card's memory); an assumption, not a reading.
RESERVED_FALLBACK_MB = 512.0


@dataclass(frozen=True)
class DeviceReading:
    """Device-level memory at one moment.

    Attributes:
        total_mb: the device's memory as its source counts it (NVML: the whole framebuffer).
        free_mb: free memory.
        source: ``nvml``, or ``cuda`` for the ``mem_get_info`` fallback.
        note: why NVML was not used, when it was not.
    """

    total_mb: float
    free_mb: float
    source: str = "nvml"
    note: str = ""

    @property
    def used_mb(self) -> float:
        """Total - free: what the organizers record."""
        return self.total_mb - self.free_mb


@dataclass(frozen=True)
class AllocatorCap:
    """The caching allocator's limit for one budget.

    Attributes:
        budget_mb: the device-level budget.
        cap_mb: what the caching allocator may reserve (may be <= 0: nothing fits).
        outside_mb: device-level use outside the allocator (context, driver reservation,
            other processes) when the cap was set.
        margin_mb: room left for the context to grow.
        fraction: ``cap_mb`` over torch's device total, for
            ``set_per_process_memory_fraction``.
        source: where the device-level figure came from (``nvml`` or ``cuda``).
        note: a caveat for the log (the fallback), or empty.
    """

    budget_mb: float
    cap_mb: float
    outside_mb: float
    margin_mb: float
    fraction: float
    source: str
    note: str = ""

    @property
    def fits(self) -> bool:
        """True when the allocator gets any memory at all."""
        return self.cap_mb > 0

    def describe(self) -> str:
        """One line for the log."""
        text = (
            f"allocator cap {self.cap_mb:.0f} MB = budget {self.budget_mb:.0f} MB - "
            f"{self.outside_mb:.0f} MB outside the allocator ({self.source}) - "
            f"{self.margin_mb:.0f} MB context margin"
        )
        return f"{text}; {self.note}" if self.note else text


def plan_allocator_cap(
    budget_mb: float,
    device_used_mb: float,
    allocator_reserved_mb: float,
    allocator_total_mb: float,
    margin_mb: float = CONTEXT_MARGIN_MB,
    source: str = "nvml",
    note: str = "",
) -> AllocatorCap:
    """The caching allocator's cap that keeps device-level use within ``budget_mb``.

    Args:
        budget_mb: device-level budget (the organizers' 4096 MB).
        device_used_mb: device-level used memory now, NVML total - free.
        allocator_reserved_mb: what torch's caching allocator holds now
            (``torch.cuda.memory_reserved``): the part of ``device_used_mb`` the cap governs.
        allocator_total_mb: the device total torch multiplies the fraction with
            (``mem_get_info``'s total, smaller than NVML's).
        margin_mb: room for the context to grow after now.
        source: where ``device_used_mb`` came from.
        note: a caveat for the log.

    Returns:
        The cap; ``fits`` is False when the budget is already spent outside the allocator.
    """
    outside = max(0.0, device_used_mb - allocator_reserved_mb)
    cap = budget_mb - outside - margin_mb
    fraction = min(1.0, max(0.0, cap) / allocator_total_mb) if allocator_total_mb > 0 else 0.0
    return AllocatorCap(budget_mb, cap, outside, margin_mb, fraction, source, note)


_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def nvml_uuid(cuda_uuid: object) -> str | None:
    """NVML's name of a device from torch's ``get_device_properties(d).uuid``.

    torch prints the bare UUID; NVML wants it with its ``GPU-`` prefix. Matching by UUID
    (not by index) stays right under ``CUDA_VISIBLE_DEVICES`` and CUDA's own ordering.
    """
    text = str(cuda_uuid)
    if text.startswith(("GPU-", "MIG-")):
        return text
    found = _UUID.search(text)
    return f"GPU-{found.group(0)}" if found else None


def read_nvml(uuid: str | None, index: int, nvml: Any = None) -> DeviceReading:
    """NVML's total and free memory of one device.

    Args:
        uuid: NVML UUID (``GPU-...``) of the device; None to use ``index``.
        index: NVML index, used when no UUID is known.
        nvml: the NVML binding; None imports ``pynvml`` from nvidia-ml-py.

    Raises:
        RuntimeError: NVML is missing or cannot read the device (one line).
    """
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            raise RuntimeError("nvidia-ml-py is not installed") from None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:
        raise RuntimeError(f"NVML unavailable ({err})") from None
    try:
        if uuid is not None:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        else:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    except nvml.NVMLError as err:
        raise RuntimeError(f"NVML cannot read the device ({err})") from None
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
    return DeviceReading(info.total / MB, info.free / MB)


class DeviceMemory(Protocol):
    """What the predictor needs from its device's memory."""

    def cap(self, budget_mb: float, margin_mb: float = CONTEXT_MARGIN_MB) -> AllocatorCap | None:
        """Limit the allocator so device-level use stays within ``budget_mb``."""
        ...

    def release(self, after: str) -> None:
        """Return cached, unused blocks to the device (``after``: the step just finished)."""
        ...


class HostMemory:
    """The CPU's stand-in: no cap, nothing cached to release."""

    def cap(self, budget_mb: float, margin_mb: float = CONTEXT_MARGIN_MB) -> AllocatorCap | None:
        """No allocator to cap on the CPU."""
        return None

    def release(self, after: str) -> None:
        """Nothing to release."""


class CudaMemory:
    """Device-level memory of one CUDA device: NVML readings, the allocator cap, releases.

    Args:
        device: the CUDA device.
        nvml: the NVML binding (None: ``pynvml``, imported on first read).
        cuda: the ``torch.cuda`` module or a stand-in with ``mem_get_info``,
            ``memory_reserved``, ``set_per_process_memory_fraction``,
            ``get_device_properties`` and ``empty_cache``.
    """

    def __init__(self, device: Any, nvml: Any = None, cuda: Any = None) -> None:
        if cuda is None:
            import torch

            cuda = torch.cuda
        self.device = device
        self._nvml = nvml
        self._cuda = cuda

    def _nvml_uuid(self) -> str | None:
        try:
            return nvml_uuid(self._cuda.get_device_properties(self.device).uuid)
        except (AttributeError, RuntimeError):
            return None

    def read(self) -> DeviceReading:
        """Device-level memory now: NVML, or ``mem_get_info`` plus an assumed reservation."""
        index = getattr(self.device, "index", None) or 0
        try:
            return read_nvml(self._nvml_uuid(), index, self._nvml)
        except RuntimeError as err:
            free, total = self._cuda.mem_get_info(self.device)
            note = (
                f"{err}: device use from mem_get_info plus an assumed "
                f"{RESERVED_FALLBACK_MB:.0f} MB driver reservation"
            )
            return DeviceReading(
                total / MB + RESERVED_FALLBACK_MB, free / MB, source="cuda", note=note
            )

    def cap(self, budget_mb: float, margin_mb: float = CONTEXT_MARGIN_MB) -> AllocatorCap | None:
        """Plan the cap from NVML's total - free and apply it to the caching allocator.

        Returns:
            The cap (also when it does not fit: the caller decides), None for no budget.
        """
        if budget_mb <= 0:
            return None
        reading = self.read()
        _, cuda_total = self._cuda.mem_get_info(self.device)
        cap = plan_allocator_cap(
            budget_mb,
            reading.used_mb,
            self._cuda.memory_reserved(self.device) / MB,
            cuda_total / MB,
            margin_mb,
            reading.source,
            reading.note,
        )
        if cap.fits:
            self._cuda.set_per_process_memory_fraction(cap.fraction, self.device)
        return cap

    def release(self, after: str) -> None:
        """Empty the caching allocator's cache: the device-level figure falls with it."""
        self._cuda.empty_cache()
