"""Tests for autobatch.memory.emulate: a known workload gives a known count of device bytes."""

from __future__ import annotations

import pytest
import torch

from autobatch.memory.emulate import BLOCK_BYTES, EmulatedDevice
from autobatch.units import format_bytes

MiB = 1 << 20


def test_block_rounding() -> None:
    assert BLOCK_BYTES == 512
    with EmulatedDevice(limit=MiB) as dev:
        a = torch.ones(1000)  # 4000 bytes -> 4096
        assert dev.allocated_bytes == 4096
        b = torch.ones(1, dtype=torch.uint8)  # 1 byte -> 512
        assert dev.allocated_bytes == 4096 + 512
        c = torch.ones(128)  # exactly 512 bytes
        assert dev.allocated_bytes == 4096 + 2 * 512
        d = torch.ones(129)  # 516 bytes -> 1024
        assert dev.allocated_bytes == 4096 + 2 * 512 + 1024
        del a, b, c, d
    assert dev.allocated_bytes == 0
    assert dev.peak_bytes == 4096 + 2 * 512 + 1024


def test_custom_block_size() -> None:
    with EmulatedDevice(limit=MiB, block_bytes=1) as dev:
        x = torch.ones(1000)
        assert dev.allocated_bytes == 4000
        del x


def test_known_workload_gives_a_known_peak() -> None:
    with EmulatedDevice(limit=MiB) as dev:
        x = torch.ones(1000)  # 4096
        y = x * 2  # 4096
        z = torch.matmul(torch.ones(10, 20), torch.ones(20, 30))  # three blocks: 1024 + 2560 + 1536
        del y
        w = torch.zeros(1000, dtype=torch.float64)  # 8000 -> 8192
    # At its peak: x, y and z's product alive (the matmul's inputs freed as soon as it returned),
    # or x, z and w.
    assert dev.peak_bytes == 4096 + max(4096 + 1024 + 2560 + 1536, 1536 + 8192)
    assert dev.allocated_bytes == 4096 + 1536 + 8192
    del x, z, w
    assert dev.allocated_bytes == 0


def test_views_add_nothing() -> None:
    with EmulatedDevice(limit=MiB) as dev:
        x = torch.ones(1000)
        views = [x[10:20], x.view(10, 100), x.reshape(100, 10), x[::2], x.unsqueeze(0), x.view(10, 100).t()]
        assert dev.allocated_bytes == 4096
        del x
        assert dev.allocated_bytes == 4096  # the views keep the storage alive
        del views
        assert dev.allocated_bytes == 0


def test_in_place_ops_add_nothing() -> None:
    with EmulatedDevice(limit=MiB) as dev:
        x = torch.ones(1000)
        x.add_(1).mul_(3).clamp_(max=5)
        x[:10] = 0
        torch.add(x, 1, out=x)
        assert dev.allocated_bytes == dev.peak_bytes == 4096
        del x


def test_out_arguments_that_grow_are_counted() -> None:
    with EmulatedDevice(limit=MiB) as dev:
        x = torch.ones(1000)
        out = torch.empty(0)
        torch.add(x, 1, out=out)  # resizes `out` to 4000 bytes
        assert dev.allocated_bytes == 2 * 4096
        del out
        assert dev.allocated_bytes == 4096


def test_growth_past_the_limit_raises() -> None:
    with EmulatedDevice(limit=6000) as dev:
        x = torch.ones(1000)
        out = torch.empty(0)
        with pytest.raises(torch.OutOfMemoryError, match=r"Tried to allocate 4\.00 KiB"):
            torch.add(x, 1, out=out)
        assert dev.allocated_bytes == 4096


def test_freed_tensors_leave_the_count() -> None:
    with EmulatedDevice(limit=MiB) as dev:
        for _ in range(10):
            t = torch.randn(1000)  # each replaces the last
            del t
        assert dev.allocated_bytes == 0
        assert dev.peak_bytes == 4096


def test_resident_tensors_are_counted_once() -> None:
    weight = torch.nn.Parameter(torch.zeros(1000))
    buffer = torch.zeros(200, dtype=torch.float64)  # 1600 -> 2048
    with EmulatedDevice(limit=MiB, resident=[weight, weight[:10], buffer, buffer.view(20, 10)]) as dev:
        assert dev.resident_bytes == dev.allocated_bytes == 4096 + 2048
        x = weight * 2
        assert dev.allocated_bytes == 2 * 4096 + 2048
        del x
    assert dev.peak_bytes == 2 * 4096 + 2048


def test_register_counts_from_then_on() -> None:
    outside = torch.zeros(1000)
    with EmulatedDevice(limit=MiB) as dev:
        assert dev.allocated_bytes == 0
        dev.register([outside, outside[5:]])
        assert dev.allocated_bytes == 4096
        dev.register([outside])
        assert dev.allocated_bytes == 4096  # registering again adds nothing


def test_host_tensors_are_not_device_memory() -> None:
    host = torch.randn(100, 100)  # 40000 bytes, created before the device
    with EmulatedDevice(limit=MiB) as dev:
        part = host[:10]  # a view of host memory
        assert dev.allocated_bytes == 0
        rows = host[torch.arange(3)]  # a gather makes a new storage: 1200 -> 1536
        assert dev.allocated_bytes == 1536
        del part, rows


def test_transfer_copies_onto_the_device() -> None:
    batch = {"x": torch.randn(1000), "y": [torch.zeros(10, dtype=torch.long)], "n": 3}
    with EmulatedDevice(limit=MiB) as dev:
        moved = dev.transfer(batch)
        assert dev.allocated_bytes == 4096 + 512
        assert moved["n"] == 3
        assert torch.equal(moved["x"], batch["x"])
        assert moved["x"].untyped_storage().data_ptr() != batch["x"].untyped_storage().data_ptr()
        del moved


def test_other_devices_are_not_counted() -> None:
    with EmulatedDevice(limit=MiB) as dev:
        meta = torch.empty(10**9, device="meta")
        assert dev.allocated_bytes == 0
        del meta
    with EmulatedDevice(limit=MiB, device="meta") as meta_dev:
        cpu = torch.ones(1000)
        assert meta_dev.allocated_bytes == 0
        del cpu


def test_over_the_limit_raises_and_holds_nothing() -> None:
    with EmulatedDevice(limit=10_000) as dev:
        keep = torch.ones(1000)  # 4096
        with pytest.raises(torch.OutOfMemoryError, match="Emulated device out of memory") as excinfo:
            torch.ones(2000)  # 8192 more would make 12288 > 10000
        assert dev.allocated_bytes == 4096
        assert dev.peak_bytes == 4096
        message = str(excinfo.value)
        assert "Tried to allocate 8.00 KiB" in message
        assert "capacity 9.77 KiB" in message
        assert "4.00 KiB already allocated" in message
        # What is left still works, up to the limit exactly.
        more = torch.ones(5 * 256)  # 5120 -> 4096 + 5120 = 9216 <= 10000
        assert dev.allocated_bytes == 9216
        del keep, more


def test_oom_is_caught_as_torch_out_of_memory() -> None:
    with EmulatedDevice(limit=4096) as dev:
        try:
            torch.ones(1025)
        except torch.OutOfMemoryError:
            caught = True
        assert caught
        assert dev.allocated_bytes == 0


def test_a_failed_step_leaves_nothing_behind() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    resident = list(model.parameters())
    host = torch.randn(256, 64)
    with EmulatedDevice(limit=200_000, resident=resident) as dev:
        x = dev.transfer(host)  # 64 KiB of the 195 KiB; the hidden layer needs 256 KiB
        before = dev.allocated_bytes
        failed = False
        try:
            model(x).sum().backward()
        except torch.OutOfMemoryError:
            failed = True
        assert failed
        # Leaving the except block drops the traceback, and with it every tensor of the failed step.
        assert dev.allocated_bytes == before
        assert all(p.grad is None for p in model.parameters())


def test_autograd_saved_tensors_count_until_backward() -> None:
    with EmulatedDevice(limit=MiB) as dev:
        w = torch.ones(1000, requires_grad=True)  # 4096
        h = (w * 2).exp()  # w * 2 is freed (mul by a scalar saves nothing); exp saves its output h
        assert dev.allocated_bytes == 2 * 4096
        s = h.sum()  # 4 bytes -> 512
        del h
        assert dev.allocated_bytes == 2 * 4096 + 512  # h is still held by the graph
        s.backward()
        # The graph is freed: h goes, w.grad (4096) comes.
        assert dev.allocated_bytes == 4096 + 4096 + 512
        assert w.grad is not None
        del s
        assert dev.allocated_bytes == 2 * 4096


def test_no_grad_holds_no_graph() -> None:
    with EmulatedDevice(limit=MiB) as dev:
        w = torch.ones(1000, requires_grad=True)
        with torch.no_grad():
            h = (w * 2).exp()
            del h
        assert dev.allocated_bytes == 4096


def _training_step_peak() -> tuple[int, int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters())
    X, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    with EmulatedDevice(limit=16 * MiB, resident=list(model.parameters())) as dev:
        for _ in range(2):
            torch.nn.functional.cross_entropy(model(X), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return dev.peak_bytes, dev.allocated_bytes


def test_peaks_are_deterministic() -> None:
    first = _training_step_peak()
    assert first[0] > first[1] > 0
    assert all(_training_step_peak() == first for _ in range(3))


def test_limit_must_be_a_positive_int() -> None:
    for bad in (0, -1, 1.5, True, "1GiB"):
        with pytest.raises(ValueError, match="`limit`"):
            EmulatedDevice(limit=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (100, "100 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (10_000, "9.77 KiB"),
        (MiB, "1.00 MiB"),
        (1.5 * (1 << 30), "1.50 GiB"),
        (1 << 40, "1024.00 GiB"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text
