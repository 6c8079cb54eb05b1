"""Tests for autobatch.memory.oom."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autobatch.errors import NoBatchFitsError
from autobatch.memory.oom import is_oom, release_memory

REPO_ROOT = Path(__file__).resolve().parents[2]

OOM_MESSAGES = [
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity; 5.12 GiB "
    "already allocated; 1.02 GiB free; 5.50 GiB reserved in total by PyTorch) If reserved memory "
    "is >> allocated memory try setting max_split_size_mb to avoid fragmentation.",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other "
    "API call, so the stacktrace below might be incorrect.",
    "HIP out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 15.98 GiB of "
    "which 312.00 MiB is free.",
    "HIP error: out of memory\nHIP kernel errors might be asynchronously reported at some other API call.",
    "XPU out of memory. Tried to allocate 59.61 GiB. GPU 0 has a total capacity of 28.55 GiB of "
    "which 12.01 GiB is free.",
    "XPU error: out of memory",
    "MPS backend out of memory (MPS allocated: 7.64 GiB, other allocations: 68.91 GiB, max "
    "allowed: 88.13 GiB). Tried to allocate 33.92 GiB on private pool. Use "
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations.",
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)",
    "[enforce fail at C:\\actions-runner\\_work\\pytorch\\c10\\core\\impl\\alloc_cpu.cpp:72] "
    "data. DefaultCPUAllocator: not enough memory: you tried to allocate 34359738368 bytes.",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
]


@pytest.mark.parametrize("message", OOM_MESSAGES)
def test_is_oom_runtime_error_messages(message: str) -> None:
    assert is_oom(RuntimeError(message))


@pytest.mark.parametrize("message", OOM_MESSAGES)
def test_is_oom_torch_runtime_error_subclass(message: str) -> None:
    # Recent torch raises "CUDA error: ..." as torch.AcceleratorError, a RuntimeError subclass.
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is None:
        pytest.skip("torch.AcceleratorError needs a newer torch")
    assert is_oom(accelerator_error(message))


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("x"),
        torch.cuda.OutOfMemoryError("y"),
        MemoryError(),
        MemoryError("cannot allocate"),
    ],
    ids=["torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError", "MemoryError", "MemoryError-msg"],
)
def test_is_oom_by_type(exc: BaseException) -> None:
    assert is_oom(exc)


def _real_shape_error() -> RuntimeError:
    try:
        torch.randn(2, 3) @ torch.randn(4, 5)
    except RuntimeError as exc:
        return exc
    raise AssertionError("the shapes should not multiply")


@pytest.mark.parametrize(
    "exc",
    [
        _real_shape_error(),
        ValueError("CUDA out of memory"),
        KeyError("CUDA out of memory"),
        RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu"),
        RuntimeError("cuda out of memory"),  # the backends' wording is case-sensitive
        NotImplementedError("CUDA out of memory"),
        NoBatchFitsError("batch size 1 failed: CUDA out of memory"),
        KeyboardInterrupt(),
        Exception("out of memory"),
    ],
    ids=[
        "shape-error",
        "ValueError",
        "KeyError",
        "device-mismatch",
        "lower-case",
        "NotImplementedError",
        "NoBatchFitsError",
        "KeyboardInterrupt",
        "Exception",
    ],
)
def test_is_oom_negatives(exc: BaseException) -> None:
    assert not is_oom(exc)


def test_is_oom_does_not_follow_cause() -> None:
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert not is_oom(outer)


def _model_with_grads() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    return model, optimizer


def test_release_memory_drops_model_grads() -> None:
    model, _ = _model_with_grads()
    release_memory(model)
    assert all(p.grad is None for p in model.parameters())


def test_release_memory_drops_optimizer_grads() -> None:
    model, optimizer = _model_with_grads()
    release_memory(optimizer)
    assert all(p.grad is None for p in model.parameters())


def test_release_memory_model_and_optimizer() -> None:
    model, optimizer = _model_with_grads()
    release_memory(model, optimizer)
    assert all(p.grad is None for p in model.parameters())


def test_release_memory_no_arguments() -> None:
    release_memory()


def test_release_memory_rejects_bad_argument_before_touching_any() -> None:
    model, _ = _model_with_grads()
    with pytest.raises(TypeError, match=r"argument 2 .* torch\.nn\.Module, but got str"):
        release_memory(model, "optimizer")  # type: ignore[arg-type]
    assert all(p.grad is not None for p in model.parameters())


def test_release_memory_rejects_parameters_iterator() -> None:
    model, _ = _model_with_grads()
    with pytest.raises(TypeError, match=r"argument 1 .* but got generator"):
        release_memory(model.parameters())  # type: ignore[arg-type]


_CHILD = textwrap.dedent(
    """
    import resource

    import torch

    from autobatch.memory.oom import is_oom

    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    vm_kib = max(int(fields[key].split()[0]) for key in ("VmSize", "VmPeak"))
    limit = vm_kib * 1024 + 512 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        # 64 GiB, far above the limit: the allocation itself fails, no page is ever touched.
        torch.empty(64 * 2**30, dtype=torch.uint8)
    except BaseException as exc:
        print(is_oom(exc), type(exc).__name__)
    else:
        print("no-exception")
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux-only")
def test_is_oom_real_cpu_allocator_failure() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    verdict, _, exc_type = result.stdout.strip().partition(" ")
    assert verdict == "True", f"stdout={result.stdout!r} stderr={result.stderr!r}"
    assert exc_type in {"RuntimeError", "OutOfMemoryError", "MemoryError"}


def test_frozen_heap_freezes_only_inside_and_respects_a_callers_freeze(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    from autobatch.memory import oom

    outer = gc.get_freeze_count()
    gc.unfreeze()  # the test session may have frozen its heap
    try:
        with oom.frozen_heap():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() == 0
        gc.freeze()
        # With the caller's freeze in place nothing is frozen or unfrozen. (Counts would be racy: a
        # frozen object that another thread frees leaves the permanent generation.)
        calls: list[str] = []
        monkeypatch.setattr(oom.gc, "freeze", lambda: calls.append("freeze"))
        monkeypatch.setattr(oom.gc, "unfreeze", lambda: calls.append("unfreeze"))
        with oom.frozen_heap():
            pass
        assert calls == []
        monkeypatch.undo()
        assert gc.get_freeze_count() > 0  # the caller's freeze is left in place
    finally:
        if not outer:
            gc.unfreeze()
        else:
            gc.freeze()


# -- what a failed allocation says it needed ---------------------------------------------------------


def test_demand_is_read_from_a_cuda_error_message() -> None:
    from autobatch.memory.oom import demand_bytes

    message = (
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 139.81 GiB of which "
        "18.00 MiB is free. Including non-PyTorch memory, this process has 1.20 GiB memory in use. Of the "
        "allocated memory 1.00 GiB is allocated by PyTorch, and 150.00 MiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF"
    )
    assert demand_bytes(torch.OutOfMemoryError(message)) == 2**30 + 170 * 2**20
    assert demand_bytes(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512 bytes.")) is None
    assert demand_bytes(RuntimeError("DefaultCPUAllocator: can't allocate memory")) is None


@pytest.mark.parametrize("emulation", ["ideal", "allocator"])
def test_the_emulated_device_says_what_the_failed_allocation_needed(emulation: str) -> None:
    from autobatch.memory.emulate import EmulatedDevice
    from autobatch.memory.oom import demand_bytes

    held = torch.zeros(256, 1024)  # 1 MiB, resident
    with (
        pytest.raises(torch.OutOfMemoryError) as caught,
        EmulatedDevice(3 * 2**20, [held], device=torch.device("cpu"), allocator=emulation == "allocator"),
    ):
        torch.ones(512, 1024) + 1  # 2 MiB each: the second does not fit next to the first and `held`
    demand = demand_bytes(caught.value)
    assert demand is not None and demand > 3 * 2**20
    if emulation == "ideal":  # live bytes: the 1 MiB resident, the 2 MiB ones and the 2 MiB asked for
        assert demand == 5 * 2**20
