"""Tests for autobatch.memory.device: limits, the choice of regime, measurement and byte counts."""

from __future__ import annotations

import os

import pytest
import torch

from autobatch.memory.device import DeviceMemory, default_cpu_limit, tensor_bytes
from autobatch.units import parse_memory_limit

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (1, 1),
        (4096, 4096),
        (8 * GiB, 8 * GiB),
        ("8GiB", 8 * GiB),
        ("512MiB", 512 * MiB),
        ("64KiB", 64 * KiB),
        ("1TiB", 1 << 40),
        ("1.5GB", 1_500_000_000),
        ("100 MB", 100_000_000),
        ("2KB", 2000),
        ("1TB", 10**12),
        ("8G", 8 * GiB),
        ("512M", 512 * MiB),
        ("4K", 4 * KiB),
        ("1T", 1 << 40),
        ("8gib", 8 * GiB),
        ("512mib", 512 * MiB),
        ("1.5gb", 1_500_000_000),
        ("  2 GiB  ", 2 * GiB),
        ("1024", 1024),
        ("1024B", 1024),
        (".5GiB", GiB // 2),
        ("1.GiB", GiB),
    ],
)
def test_parse_memory_limit(value: int | str | None, expected: int | None) -> None:
    assert parse_memory_limit(value) == expected


@pytest.mark.parametrize(
    "value", ["lots", "", "GiB", "8 XB", "8GiBs", "1,5GB", "-1GiB", "8 Gi B", "1e9", "0x10", "1.5.2GB"]
)
def test_parse_memory_limit_bad_strings(value: str) -> None:
    with pytest.raises(ValueError, match="Expected `memory_limit` to be a size such as '8GiB'"):
        parse_memory_limit(value)


@pytest.mark.parametrize("value", [0, -1, -(8 * GiB), "0GiB", "0", "0.0001KB"])
def test_parse_memory_limit_not_positive(value: int | str) -> None:
    with pytest.raises(ValueError, match="Expected `memory_limit` to be a positive size"):
        parse_memory_limit(value)


@pytest.mark.parametrize("value", [1.5, 8e9, True, False, [8], b"8GiB", torch.tensor(8)])
def test_parse_memory_limit_bad_types(value: object) -> None:
    with pytest.raises(TypeError, match="Expected `memory_limit` to be an int of bytes or a string"):
        parse_memory_limit(value)  # type: ignore[arg-type]


def test_parse_memory_limit_names_the_argument() -> None:
    with pytest.raises(ValueError, match="`--memory-limit`"):
        parse_memory_limit("lots", name="--memory-limit")


def _total_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads /proc/meminfo")
def test_default_cpu_limit_is_half_the_available_ram() -> None:
    limit = default_cpu_limit()
    assert isinstance(limit, int)
    assert 0 < limit < _total_ram()
    assert limit <= _total_ram() // 2 + 1


def test_cpu_with_a_limit_is_emulated() -> None:
    memory = DeviceMemory(CPU, 4 * MiB)
    assert memory.emulated and not memory.is_cuda
    assert memory.limit == 4 * MiB
    assert memory.describe() == "4.00 MiB (emulated)"


def test_cpu_without_a_limit_is_not_emulated() -> None:
    memory = DeviceMemory(CPU, None)
    assert not memory.emulated
    assert memory.limit is None
    assert memory.describe() == "no limit"
    with memory.measure() as measured:
        x = torch.ones(1000)
    assert measured.peak_bytes is None and measured.peak_so_far() is None
    moved = memory.transfer((x, 3))
    assert moved[0] is x and moved[1] == 3  # already on the device: no copy


def test_a_guarded_probe_without_a_limit_emulates_half_the_available_ram() -> None:
    unlimited = DeviceMemory(CPU, None)
    guarded = unlimited.guarded()
    assert guarded.emulated and guarded.guard and not unlimited.emulated
    assert guarded.limit is not None and guarded.limit > 0
    assert guarded.describe().endswith("(emulated: half the available RAM, as no memory_limit was given)")
    limited = DeviceMemory(CPU, 4 * MiB)
    assert limited.guarded() is limited  # a given limit is the limit, for the probe and training alike


def test_capacity_is_the_limit() -> None:
    assert DeviceMemory(CPU, 4 * MiB).capacity == 4 * MiB
    assert DeviceMemory(CPU, None).capacity is None


def test_emulated_measure_counts_residents_and_peaks() -> None:
    memory = DeviceMemory(CPU, MiB)
    weight = torch.zeros(1000)
    with memory.measure([weight]) as measured:
        assert measured.resident_bytes == 4096
        moved = memory.transfer({"x": torch.ones(1000)})  # a counted copy
        y = moved["x"] * 2
        assert measured.peak_so_far() == 3 * 4096
        del y, moved
    assert measured.peak_bytes == 3 * 4096
    copied = memory.transfer(weight)  # always a copy onto the device, as host-to-device is
    assert copied is not weight and torch.equal(copied, weight)


def test_emulated_measure_raises_out_of_memory() -> None:
    memory = DeviceMemory(CPU, 8 * KiB)
    with pytest.raises(torch.OutOfMemoryError), memory.measure():
        torch.ones(4 * KiB)


def test_capped_is_a_no_op_off_cuda() -> None:
    memory = DeviceMemory(CPU, MiB)
    with memory.capped():
        x = torch.ones(10 * MiB // 4)  # not measured: nothing is capped on the CPU
    assert x.numel() == 10 * MiB // 4


def test_tensor_bytes_counts_each_storage_once() -> None:
    x = torch.zeros(1000)
    y = torch.zeros(10, dtype=torch.float64)
    assert tensor_bytes([x]) == 4000
    assert tensor_bytes([x, x[:10], x.view(10, 100), y, y[::2]]) == 4080
    assert tensor_bytes([]) == 0
    assert tensor_bytes([x[:10]]) == 4000  # a view holds its whole storage


def test_tensor_bytes_tells_fake_and_meta_storages_apart() -> None:
    # They all report address 0: a prediction's model state would count one storage of many.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = [torch.empty(1000), torch.empty(10, dtype=torch.float64)]
    meta = [torch.empty(1000, device="meta"), torch.empty(500, device="meta")]
    assert tensor_bytes([*fake, fake[0][:10]]) == 4080
    assert tensor_bytes(meta) == 6000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cap_is_set_and_restored() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    memory = DeviceMemory(device, GiB)
    assert not memory.emulated and memory.describe() == "1.00 GiB (allocator cap)"
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda index: None)
    before = fraction(device.index)
    with memory.capped(), pytest.raises(torch.OutOfMemoryError):
        torch.empty(2 * GiB, dtype=torch.uint8, device=device)
    assert fraction(device.index) == before
    with memory.measure() as measured:
        x = torch.empty(64 * MiB, dtype=torch.uint8, device=device)
    assert measured.peak_bytes is not None and measured.peak_bytes >= 64 * MiB
    del x


@pytest.mark.parametrize(
    ("limit", "emulation", "allocator"),
    [(MiB, "auto", False), (64 * MiB, "auto", True), (64 * MiB, "ideal", False), (MiB, "allocator", True)],
)
def test_the_emulation_follows_the_option_and_the_limit(limit: int, emulation: str, allocator: bool) -> None:
    memory = DeviceMemory(CPU, limit, emulation)
    assert memory.emulated and memory.allocator is allocator and memory.counts_reserved is allocator
    assert memory.describe().endswith("(emulated, CUDA's caching allocator)" if allocator else "(emulated)")


def test_the_allocator_caps_reserved_memory() -> None:
    memory = DeviceMemory(CPU, 4 * MiB, "allocator")
    with memory.measure() as measured:
        held = [torch.ones(200_000) for _ in range(4)]  # 800 KB each: two fit a 2 MiB small segment
        assert measured.peak_so_far() == 4 * MiB
        with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
            torch.ones(200_000)  # a third segment would take reserved memory to 6 MiB
        del held
    assert measured.peak_bytes == measured.reserved_bytes == 4 * MiB


def test_a_trace_records_the_allocations_in_order() -> None:
    memory = DeviceMemory(CPU, MiB)
    weight = torch.zeros(100)
    with memory.measure([weight], trace=True) as measured:
        a = torch.ones(10)
        b = a * 2
        del a
        del b
    assert measured.trace == ((400,), (("alloc", 0, 40), ("alloc", 1, 40), ("free", 0), ("free", 1)))
