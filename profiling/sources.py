"""Where the numbers come from: the GPU (NVML) and the command's process tree (psutil).

The GPU is reached through :class:`GpuSource`, a small protocol, so that tests (and machines
without NVIDIA hardware) can hand the sampler any object with the same three methods.
:class:`NvmlSource` is the real one and reads exactly what the organizers read: device-level
used memory = total - free, i.e. everything resident on the device, CUDA context included.

Memory is reported in "MB" as the organizers' tooling does (``nvidia-smi``'s numbers), which
are binary megabytes: 1 MB = 2**20 bytes here, everywhere in the profiler.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import psutil

#: Bytes per "MB" as nvidia-smi and the organizers count them (MiB).
BYTES_PER_MB = 1 << 20


@dataclass(frozen=True)
class GpuReading:
    """One read of the GPU.

    Attributes:
        used_mb: device-level used memory, total - free (what the organizers record).
        util_percent: GPU utilisation over NVML's last sample period, None if unsupported.
        process_mb: memory NVML attributes to each of the asked-for pids, summed over the
            process tree by the caller; None when NVML cannot attribute memory to processes
            (containers, some drivers) or when attribution was not asked for.
    """

    used_mb: float
    util_percent: float | None = None
    process_mb: float | None = None


@runtime_checkable
class GpuSource(Protocol):
    """What the sampler needs from a GPU. Implementations must be safe to call from a thread."""

    def read(self, pids: Collection[int] | None) -> GpuReading | None:
        """Read the device now.

        Args:
            pids: processes whose GPU memory should be summed into ``process_mb``; None
                means "do not attribute" (e.g. the command runs in a container).

        Returns:
            The reading, or None when no GPU can be read (then GPU figures are "n/a").
        """
        ...

    def describe(self) -> dict[str, object]:
        """Facts for the report.

        Returns:
            ``available`` (bool); ``reason`` when not available; ``name``, ``driver``,
            ``total_mb`` and ``index`` when available.
        """
        ...

    def close(self) -> None:
        """Release the library handle; further reads are not allowed."""
        ...


class NullSource:
    """The GPU source of a machine without a usable GPU: every read is None."""

    def __init__(self, reason: str) -> None:
        """Args: reason: one line saying why there is no GPU (shown in summary.md)."""
        self.reason = reason

    def read(self, pids: Collection[int] | None) -> GpuReading | None:
        """No GPU: always None."""
        return None

    def describe(self) -> dict[str, object]:
        """``available`` False and the reason."""
        return {"available": False, "reason": self.reason}

    def close(self) -> None:
        """Nothing to release."""


class GpuUnavailable(RuntimeError):
    """NVML or the requested device cannot be used; the message is one line for the user."""


class NvmlSource:
    """Reads one GPU through NVML (``nvidia-ml-py``, imported as ``pynvml``).

    Raises:
        GpuUnavailable: from the constructor when NVML is missing, fails to initialise, or
            has no device at ``index``.
    """

    def __init__(self, index: int = 0, nvml: Any = None) -> None:
        """Open the device.

        Args:
            index: NVML device index (PCI bus order, like ``nvidia-smi``).
            nvml: the NVML binding; None imports ``pynvml`` from nvidia-ml-py (tests pass
                a stand-in with the same functions).
        """
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                raise GpuUnavailable("no NVML: the nvidia-ml-py package is not installed") from None
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            raise GpuUnavailable(f"no NVML ({err})") from None
        try:
            count = nvml.nvmlDeviceGetCount()
            if not 0 <= index < count:
                raise GpuUnavailable(f"no device: GPU index {index} requested, NVML sees {count}")
            self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as err:
            nvml.nvmlShutdown()
            raise GpuUnavailable(f"no device ({err})") from None
        except GpuUnavailable:
            nvml.nvmlShutdown()
            raise
        self.index = index
        # Probe once: processes and utilisation are unsupported on some devices; asking
        # every 0.1 s for something that always fails would only cost time.
        self._util_ok = self._try(nvml.nvmlDeviceGetUtilizationRates, self._handle) is not None
        self._procs_ok = self._try(self._process_memory, ()) is not None

    def _try(self, fn, *args):
        """``fn(*args)``, or None when NVML says the query is unsupported or failed."""
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def _process_memory(self, pids: Collection[int]) -> float:
        nvml = self._nvml
        wanted = set(pids)
        total_bytes = 0
        seen: set[int] = set()
        # Compute and graphics lists overlap for processes that do both; count each pid once.
        for query in (
            nvml.nvmlDeviceGetComputeRunningProcesses,
            nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            for proc in query(self._handle):
                if proc.pid in wanted and proc.pid not in seen and proc.usedGpuMemory is not None:
                    seen.add(proc.pid)
                    total_bytes += proc.usedGpuMemory
        return total_bytes / BYTES_PER_MB

    def read(self, pids: Collection[int] | None) -> GpuReading | None:
        """Device used memory (total - free), utilisation and the pids' memory."""
        nvml = self._nvml
        try:
            mem = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except nvml.NVMLError:
            return None
        util = None
        if self._util_ok:
            rates = self._try(nvml.nvmlDeviceGetUtilizationRates, self._handle)
            util = float(rates.gpu) if rates is not None else None
        process_mb = None
        if pids is not None and self._procs_ok:
            process_mb = self._try(self._process_memory, pids)
        return GpuReading(
            used_mb=(mem.total - mem.free) / BYTES_PER_MB,
            util_percent=util,
            process_mb=process_mb,
        )

    def describe(self) -> dict[str, object]:
        """Device name, driver, total memory and the NVML index."""
        nvml = self._nvml

        def text(value: object) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        info: dict[str, object] = {"available": True, "index": self.index}
        for key, fn, args in (
            ("name", nvml.nvmlDeviceGetName, (self._handle,)),
            ("driver", nvml.nvmlSystemGetDriverVersion, ()),
            ("nvml_version", nvml.nvmlSystemGetNVMLVersion, ()),
        ):
            try:
                info[key] = text(fn(*args))
            except nvml.NVMLError:
                info[key] = None
        try:
            info["total_mb"] = nvml.nvmlDeviceGetMemoryInfo(self._handle).total / BYTES_PER_MB
        except nvml.NVMLError:
            info["total_mb"] = None
        info["process_attribution"] = self._procs_ok
        return info

    def close(self) -> None:
        """Shut NVML down (it is reference counted, so other users are unaffected)."""
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def open_gpu_source(index: int = 0) -> GpuSource:
    """The real GPU source if NVML and the device are there, else a :class:`NullSource`."""
    try:
        return NvmlSource(index)
    except GpuUnavailable as err:
        return NullSource(str(err))


@dataclass(frozen=True)
class TreeUsage:
    """Host-side usage of a process tree at one moment.

    Attributes:
        pids: the root and all its live descendants.
        rss_mb: resident set size summed over the tree (shared pages count once per process,
            as ``ps`` does; for one Python process that is the usual figure).
        cpu_percent: CPU use summed over the tree since the previous read (100 = one core).
    """

    pids: tuple[int, ...]
    rss_mb: float
    cpu_percent: float


@dataclass
class ProcessTreeMonitor:
    """Reads RSS and CPU of a process and its descendants with psutil.

    CPU percent is a rate between two reads of the same ``psutil.Process`` object, so the
    objects are kept between reads; a process that appears later reports 0 on its first read.
    """

    root_pid: int
    _procs: dict[int, psutil.Process] = field(default_factory=dict)

    def read(self) -> TreeUsage:
        """The tree as it is now; processes that vanish mid-read are skipped."""
        try:
            root = self._cached(self.root_pid)
            members = [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return TreeUsage(pids=(), rss_mb=0.0, cpu_percent=0.0)
        pids, rss, cpu = [], 0, 0.0
        for proc in members:
            proc = self._cached(proc.pid, proc)
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    cpu += proc.cpu_percent(None)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            pids.append(proc.pid)
        return TreeUsage(pids=tuple(pids), rss_mb=rss / BYTES_PER_MB, cpu_percent=cpu)

    def seen(self) -> list[psutil.Process]:
        """Every process met in the tree at any read, live or not (the profiler ends them).

        A process that was reparented since (a daemon, ``setsid ... &`` whose parent
        exited) is still here; one whose pid was taken by another process since is not
        confused with it: psutil checks the creation time before it signals.
        """
        return list(self._procs.values())

    def _cached(self, pid: int, proc: psutil.Process | None = None) -> psutil.Process:
        cached = self._procs.get(pid)
        # A recycled pid is a different process: psutil compares creation times in ==.
        if cached is None or (proc is not None and cached != proc):
            cached = proc if proc is not None else psutil.Process(pid)
            self._procs[pid] = cached
        return cached


def machine_info() -> dict[str, object]:
    """CPU model, core count, RAM and OS of this machine, for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_cores_logical": os.cpu_count(),
        "ram_mb": round(psutil.virtual_memory().total / BYTES_PER_MB),
        "os": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }
