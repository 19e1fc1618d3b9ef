"""The device-memory budget as the organizers count it, tested without a GPU.

NVML and ``torch.cuda``'s memory functions are replaced by stand-ins passed as parameters
(``CudaMemory(device, nvml=..., cuda=...)``); the arithmetic and the predictor's use of it
are the real code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from inference.budget import BufferPlan, retry_plans
from inference.device_memory import (
    MB,
    CudaMemory,
    HostMemory,
    nvml_uuid,
    plan_allocator_cap,
)
from inference.model import ModelError, load_model
from inference.predictor import Predictor

CPU = torch.device("cpu")
UUID = "58d9b9b5-6d33-bbd8-b4a9-aa4d9c5d8e6a"


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeNvml:
    """NVML as nvidia-ml-py exposes it, for one device known by UUID."""

    total_mb: float
    free_mb: float
    uuid: str = f"GPU-{UUID}"
    available: bool = True
    calls: list[str] = field(default_factory=list)
    NVMLError = FakeNVMLError

    def nvmlInit(self):
        self.calls.append("init")
        if not self.available:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid != self.uuid:
            raise FakeNVMLError(f"unknown uuid {uuid}")
        return "handle"

    def nvmlDeviceGetHandleByIndex(self, index):
        raise AssertionError("the device must be found by UUID, not by index")

    def nvmlDeviceGetMemoryInfo(self, handle):
        assert handle == "handle"
        return SimpleNamespace(total=int(self.total_mb * MB), free=int(self.free_mb * MB))


@dataclass
class FakeCuda:
    """The ``torch.cuda`` functions CudaMemory uses, with a driver reservation NVML sees.

    ``mem_get_info`` reports the CUDA runtime's view: its total lacks the driver's
    reservation, as on real cards (24576 MB in NVML, 24268 MB in CUDA on a 24 GB card).
    """

    nvml: FakeNvml
    reserved_by_driver_mb: float
    allocator_reserved_mb: float
    fractions: list[float] = field(default_factory=list)
    emptied: int = 0

    def mem_get_info(self, device):
        total = self.nvml.total_mb - self.reserved_by_driver_mb
        return int(self.nvml.free_mb * MB), int(total * MB)

    def memory_reserved(self, device):
        return int(self.allocator_reserved_mb * MB)

    def set_per_process_memory_fraction(self, fraction, device):
        self.fractions.append(fraction)

    def get_device_properties(self, device):
        return SimpleNamespace(uuid=UUID)

    def empty_cache(self):
        self.emptied += 1


def _card(context_mb=500.0, allocator_mb=250.0, other_mb=0.0, driver_mb=308.0):
    """A 24 GB card with a context, the weights in the allocator, maybe other processes."""
    total = 24576.0
    used = driver_mb + context_mb + allocator_mb + other_mb
    nvml = FakeNvml(total, total - used)
    return nvml, FakeCuda(nvml, driver_mb, allocator_mb)


def test_cap_counts_everything_nvml_sees_outside_the_allocator():
    cap = plan_allocator_cap(4096, 1058, 250, 24268, margin_mb=384)
    # outside = NVML used - allocator = driver reservation + context (+ other processes)
    assert cap.outside_mb == pytest.approx(808)
    assert cap.cap_mb == pytest.approx(4096 - 808 - 384)
    # the fraction is taken of torch's total, the figure torch multiplies it with
    assert cap.fraction == pytest.approx(cap.cap_mb / 24268)
    assert cap.fits and "NVML" not in cap.describe() and "2904 MB" in cap.describe()
    spent = plan_allocator_cap(4096, 4000, 0, 24268, margin_mb=384)
    assert not spent.fits and spent.fraction == 0.0


def test_cuda_memory_caps_from_nvml_total_minus_free_not_mem_get_info():
    nvml, cuda = _card(context_mb=500, allocator_mb=250, other_mb=300, driver_mb=308)
    cap = CudaMemory(torch.device("cuda", 0), nvml=nvml, cuda=cuda).cap(4096, 384)
    # The driver's 308 MB, the context and the other process all count against the budget:
    assert cap.source == "nvml" and cap.outside_mb == pytest.approx(308 + 500 + 300, abs=0.01)
    assert cap.cap_mb == pytest.approx(4096 - 1108 - 384, abs=0.01)
    # ...which mem_get_info alone would have missed by the driver's reservation:
    free, total = cuda.mem_get_info(None)
    from_cuda = 4096 - ((total - free) / MB - 250) - 384
    assert from_cuda - cap.cap_mb == pytest.approx(308, abs=0.01)
    assert cuda.fractions == [pytest.approx(cap.cap_mb / (24576 - 308))]
    assert nvml.calls == ["init", "shutdown"]


def test_cuda_memory_without_nvml_assumes_a_reservation_and_says_so():
    nvml, cuda = _card(driver_mb=308)
    nvml.available = False
    cap = CudaMemory(torch.device("cuda", 0), nvml=nvml, cuda=cuda).cap(4096, 384)
    assert cap.source == "cuda" and "assumed 512 MB driver reservation" in cap.describe()
    # 512 MB assumed instead of the 308 MB the card really reserves
    assert cap.outside_mb == pytest.approx(512 + 500, abs=0.01)


def test_cuda_memory_refuses_nothing_and_sets_no_limit_without_a_budget():
    nvml, cuda = _card()
    memory = CudaMemory(torch.device("cuda", 0), nvml=nvml, cuda=cuda)
    assert memory.cap(0) is None and cuda.fractions == [] and nvml.calls == []
    memory.release("sliding window")
    assert cuda.emptied == 1
    assert HostMemory().cap(4096) is None


def test_nvml_uuid_from_torch_properties():
    assert nvml_uuid(UUID) == f"GPU-{UUID}"
    assert nvml_uuid(f"UUID('{UUID}')") == f"GPU-{UUID}"
    assert nvml_uuid(f"MIG-{UUID}") == f"MIG-{UUID}"
    assert nvml_uuid("no uuid") is None


def test_out_of_memory_ladder_tries_float16_on_the_device_before_the_host():
    first = BufferPlan(True, True, True, False, 4, 1234.0)
    ladder = [
        (p.tile_batch, p.image_on_device, p.acc_on_device, p.acc_fp16) for p in retry_plans(first)
    ]
    assert ladder == [
        (4, True, True, False),  # the plan
        (1, True, True, False),  # one tile per batch
        (1, True, True, True),  # float16 accumulator, still on the device
        (1, True, False, False),  # accumulator in pinned host memory
        (1, False, False, False),  # image in host memory too; then the CPU
    ]
    # a plan that starts with the float16 accumulator skips that step
    assert len(retry_plans(BufferPlan(True, True, True, True, 1, 0.0))) == 3


class RecordingMemory:
    """A device memory that records what the predictor asks of it."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def cap(self, budget_mb, margin_mb=384.0):
        self.events.append(f"cap {budget_mb:g}")

    def release(self, after):
        self.events.append(f"release after {after}")


def test_predictor_releases_cached_blocks_after_the_sliding_window_and_restore(tiny_model):
    memory = RecordingMemory()
    image = np.random.default_rng(0).normal(0, 200, (20, 40, 40)).astype(np.float32)
    result = Predictor([load_model(tiny_model)], CPU, memory=memory).predict(image, (2, 1.6, 1.6))
    assert result.labels.shape == image.shape
    assert memory.events == ["release after sliding window", "release after restore"]


def test_predictor_refuses_a_budget_spent_before_it_starts(tiny_model):
    # The thin caller on a device whose context already holds the budget: a clear error.
    nvml, cuda = _card(context_mb=4000)
    memory = CudaMemory(torch.device("cuda", 0), nvml=nvml, cuda=cuda)
    predictor = Predictor([load_model(tiny_model)], CPU, memory=memory)
    with pytest.raises(ModelError, match=r"already use 4308 MB of the 4096 MB budget"):
        predictor._limit_allocator()
    nvml, cuda = _card(context_mb=500)
    predictor.memory = CudaMemory(torch.device("cuda", 0), nvml=nvml, cuda=cuda)
    assert predictor._limit_allocator() == pytest.approx(4096 - 808 - 384, abs=0.01)
    assert predictor.allocator_cap is not None and predictor.allocator_cap.source == "nvml"
