"""The pytest kit: the plugin through ``pytester`` (markers, fixture, restoration) and the assertions."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autobatch.memory.device import memory_limit_scope, resolve_memory_limit
from autobatch.testing import DeviceLimit, assert_fits, assert_trains

pytest_plugins = ["pytester"]

# Under 64 KiB in fp32 with AdamW, this MLP fits a batch of 22 and not 23 (the emulated device is exact).
LIMIT = "64KiB"
FITS, LARGEST, TOO_BIG = 16, 24, 64

INNER_HEADER = """
import pytest, torch
from autobatch.memory.device import resolve_memory_limit
from autobatch.testing import assert_fits, assert_trains

def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

SAMPLE = (torch.randn(32), 3)
"""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def sample() -> tuple[torch.Tensor, int]:
    return torch.randn(32), 3


def xy(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 32, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def run_inner(pytester: pytest.Pytester, body: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_inner=INNER_HEADER + body)
    # Hypothesis' plugin imports hypothesis at the end of every run (pytester unloads it again): 1.7 s a run.
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args)
    assert resolve_memory_limit(None) is None  # nothing leaks into this session either
    return result


# -- the plugin ------------------------------------------------------------------------------------


def test_plugin_is_loaded_through_the_entry_point(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.has_plugin("autobatch")
    markers = pytestconfig.getini("markers")
    assert any(m.startswith("memory_limit(limit, *, gpu=None, predict=False)") for m in markers)


def test_marker_fits_fails_and_restores(pytester: pytest.Pytester) -> None:
    body = f"""
@pytest.mark.memory_limit("{LIMIT}")
def test_fits(memory_limit):
    assert memory_limit.limit == resolve_memory_limit(None) == 64 * 1024
    trial = assert_fits(mlp(), SAMPLE, {FITS}, precision="fp32")
    assert trial.peak_bytes <= memory_limit.limit

@pytest.mark.memory_limit("{LIMIT}")
def test_too_big():
    assert_fits(mlp(), SAMPLE, {TOO_BIG}, precision="fp32")

def test_restored_after_a_failure():
    assert resolve_memory_limit(None) is None
"""
    result = run_inner(pytester, body)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            f"*AssertionError: batch {TOO_BIG} does not fit in 64.00 KiB (emulated on cpu, fp32): "
            f"estimated peak * vs limit 64.00 KiB; largest batch that fits: {LARGEST} (peak *)*",
        ]
    )


def test_fixture_reports_the_device_and_module_markers_apply(pytester: pytest.Pytester) -> None:
    body = """
pytestmark = pytest.mark.memory_limit("1MiB")

def test_module_marker(memory_limit):
    assert memory_limit.limit == 2**20
    assert memory_limit.emulated == (not torch.cuda.is_available())
    assert str(memory_limit).startswith("1.00 MiB (")

@pytest.mark.memory_limit(limit=4096)
def test_closest_marker_wins(memory_limit):
    assert memory_limit.limit == resolve_memory_limit(None) == 4096
"""
    run_inner(pytester, body).assert_outcomes(passed=2)


def test_fixture_without_the_marker_errors(pytester: pytest.Pytester) -> None:
    result = run_inner(pytester, "\ndef test_unmarked(memory_limit):\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*mark the test with @pytest.mark.memory_limit('4GiB')*"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('"4 parsecs"', "*Expected `@pytest.mark.memory_limit` to be a size such as '8GiB'*'4 parsecs'*"),
        ("-1", "*Expected `@pytest.mark.memory_limit` to be a positive size, but got -1*"),
        ("", "*Expected `@pytest.mark.memory_limit` to take one limit*but got memory_limit()*"),
        ('"1GiB", "2GiB"', "*to take one limit*but got memory_limit('1GiB', '2GiB')*"),
        ("None", "*to take one limit*but got memory_limit(None)*"),
        ('size="1GiB"', "*to take one limit*but got memory_limit(size='1GiB')*"),
        ("1.5", "*Expected `@pytest.mark.memory_limit` to be an int of bytes or a string*"),
    ],
)
def test_bad_marker_values_error_clearly(pytester: pytest.Pytester, marker: str, message: str) -> None:
    result = run_inner(pytester, f"\n@pytest.mark.memory_limit({marker})\ndef test_bad():\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])


def test_gpu_marker_skips_without_cuda(pytester: pytest.Pytester) -> None:
    body = "\n@pytest.mark.gpu\ndef test_on_gpu():\n    assert torch.cuda.is_available()\n"
    result = run_inner(pytester, body, "-rs", "--strict-markers")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(["*needs a CUDA device*"])


def test_assert_trains_under_the_marker(pytester: pytest.Pytester) -> None:
    body = """
X, y = torch.randn(256, 32), torch.randint(0, 4, (256,))

@pytest.mark.memory_limit("64KiB")
def test_trains():
    assert assert_trains(mlp(), (X, y), 32, device="cpu", precision="fp32").optimizer_steps == 2

@pytest.mark.memory_limit("16KiB")
def test_nothing_fits():
    assert_trains(mlp(), (X, y), 32, device="cpu", precision="fp32")
"""
    result = run_inner(pytester, body)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: nothing fits in 16.00 KiB*Not even a batch of 1*"])


@pytest.mark.gpu
def test_cuda_allocator_is_capped_and_restored(pytester: pytest.Pytester) -> None:
    body = """
index = torch.cuda.current_device()
before = torch.cuda.get_per_process_memory_fraction(index)
total = torch.cuda.get_device_properties(index).total_memory

@pytest.mark.memory_limit("1GiB")
def test_capped(memory_limit):
    assert not memory_limit.emulated and memory_limit.device.type == "cuda"
    assert torch.cuda.get_per_process_memory_fraction(index) == pytest.approx(2**30 / total)
    assert_fits(mlp().cuda(), SAMPLE, 16)
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")

@pytest.mark.memory_limit("1GiB")
def test_fails_under_the_cap():
    assert False

def test_restored():
    assert torch.cuda.get_per_process_memory_fraction(index) == before
"""
    run_inner(pytester, body).assert_outcomes(passed=2, failed=1)


# -- assert_fits -----------------------------------------------------------------------------------


def test_assert_fits_returns_the_trial() -> None:
    trial = assert_fits(mlp(), sample(), FITS, memory_limit=LIMIT, precision="fp32")
    assert trial.fitted and trial.batch == FITS
    assert trial.peak_bytes is not None and 0 < trial.peak_bytes <= 64 * 1024


def test_assert_fits_message_gives_peak_vs_limit_and_the_largest_fitting_batch() -> None:
    with pytest.raises(AssertionError) as info:
        assert_fits(mlp(), sample(), TOO_BIG, memory_limit=LIMIT, precision="fp32")
    message = str(info.value)
    assert message.startswith(f"batch {TOO_BIG} does not fit in 64.00 KiB (emulated on cpu, fp32): ")
    assert "estimated peak " in message and " vs limit 64.00 KiB" in message
    assert f"largest batch that fits: {LARGEST} (peak " in message
    estimate = float(message.split("estimated peak ")[1].split(" KiB")[0])
    assert estimate > 64  # beyond the limit, as a batch that did not fit must be


def test_assert_fits_when_not_even_one_sample_fits() -> None:
    with pytest.raises(AssertionError, match=r"not even a batch of 1 fits.*largest batch that fits: none"):
        assert_fits(mlp(), sample(), 8, memory_limit="16KiB", precision="fp32")


def test_assert_fits_uses_the_scope_and_needs_a_limit() -> None:
    with memory_limit_scope(LIMIT):
        assert assert_fits(mlp(), sample(), FITS, precision="fp32").fitted
    with pytest.raises(TypeError, match="needs a memory limit: pass memory_limit="):
        assert_fits(mlp(), sample(), FITS, precision="fp32")


def test_assert_fits_takes_dict_samples() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> Any:
            return SimpleNamespace(loss=nn.functional.cross_entropy(self.linear(x), labels))

    trial = assert_fits(
        Tagger(), {"x": torch.randn(32), "labels": 2}, 8, memory_limit=LIMIT, precision="fp32", steps=3
    )
    assert trial.fitted


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "`batch_size` to be a positive int, but got 0"),
        ({"batch_size": "8"}, TypeError, "`batch_size` to be a positive int"),
        ({"steps": 0}, ValueError, "`steps` to be a positive int"),
        ({"sample": torch.randn(32)}, TypeError, "`sample` to be one training sample.*got Tensor"),
        ({"sample": ()}, TypeError, "`sample` to be one training sample"),
        ({"sample": ("text", 1)}, TypeError, r"`sample\[0\]` to be a tensor or a number, but got str"),
        ({"sample": {"x": [1, 2]}}, TypeError, r"`sample\['x'\]` to be a tensor or a number"),
        ({"memory_limit": "lots"}, ValueError, "`memory_limit` to be a size"),
        ({"max_batch": 8}, TypeError, "try_batch\\(\\) got an unexpected keyword argument `max_batch`"),
    ],
)
def test_assert_fits_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    arguments: dict[str, Any] = {"sample": sample(), "batch_size": FITS, "memory_limit": LIMIT, **kwargs}
    with pytest.raises(error, match=match):
        assert_fits(mlp(), arguments.pop("sample"), arguments.pop("batch_size"), **arguments)


# -- assert_trains ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tensors", "dataset", "loader"])
def test_assert_trains_runs_a_short_fit(form: str) -> None:
    X, y = xy()
    data: Any = {
        "tensors": (X, y),
        "dataset": TensorDataset(X, y),
        "loader": DataLoader(TensorDataset(X, y), batch_size=7, shuffle=True),
    }[form]
    result = assert_trains(mlp(), data, 32, memory_limit=LIMIT, device="cpu", precision="fp32", seed=0)
    assert (result.optimizer_steps, result.samples, result.epochs) == (2, 64, 1)
    # fit's probe replays its own plan: one micro-batch of 32 survives where two micro-steps of 25 do not.
    assert result.plan.effective_batch == 32 and result.backoffs == []


def test_assert_trains_steps_none_uses_all_the_data() -> None:
    result = assert_trains(mlp(), xy(96), 32, memory_limit=LIMIT, steps=None, device="cpu", precision="fp32")
    assert (result.optimizer_steps, result.samples) == (3, 96)


def test_assert_trains_nothing_fits() -> None:
    with pytest.raises(
        AssertionError, match=r"nothing fits in 16.00 KiB \(emulated on cpu, fp32\): Not even"
    ):
        assert_trains(mlp(), xy(), 32, memory_limit="16KiB", device="cpu", precision="fp32")


def test_assert_trains_diverged() -> None:
    def nan_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        return model(batch[0]).sum() * float("nan")

    with pytest.raises(AssertionError, match="training diverged: loss nan at step 1 of 2"):
        assert_trains(mlp(), xy(), 32, memory_limit=LIMIT, device="cpu", precision="fp32", step_fn=nan_loss)


def test_assert_trains_lets_other_errors_through() -> None:
    def broken(model: nn.Module, batch: Any) -> torch.Tensor:
        raise KeyError("not an out-of-memory error")

    with pytest.raises(KeyError, match="not an out-of-memory error"):
        assert_trains(mlp(), xy(), 32, memory_limit=LIMIT, device="cpu", step_fn=broken)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_batch": 0}, ValueError, "`target_batch` to be a positive int"),
        ({"steps": 0}, ValueError, "`steps` to be a positive int"),
        ({"memory_limit": None}, TypeError, "assert_trains\\(\\) needs a memory limit"),
    ],
)
def test_assert_trains_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    arguments: dict[str, Any] = {"target_batch": 32, "memory_limit": LIMIT, **kwargs}
    with pytest.raises(error, match=match):
        assert_trains(mlp(), xy(), arguments.pop("target_batch"), **arguments)


# -- predicted ---------------------------------------------------------------------------------------


def test_a_card_marker_predicts_on_the_cpu(pytester: pytest.Pytester) -> None:
    from autobatch.memory.cards import CARDS

    body = f"""
@pytest.mark.memory_limit(gpu="T4", predict=True)
def test_fits_a_t4(memory_limit):
    assert (memory_limit.gpu, memory_limit.predict, memory_limit.limit) == ("T4", True, {CARDS["T4"].budget})
    trial = assert_fits(mlp(), SAMPLE, 4096)  # predicted in fp16 for the T4's kernels: no step at 4096 ran
    assert trial.fitted and 0 < trial.peak_bytes < memory_limit.limit

@pytest.mark.memory_limit("64MiB", gpu="t4", predict=True)  # a card shared: its allocator capped further
def test_too_big_for_a_share_of_the_card(memory_limit):
    assert memory_limit.limit == 64 * 2**20
    assert_fits(mlp(), SAMPLE, 10**6)

@pytest.mark.memory_limit("{LIMIT}", predict=True)
def test_a_limit_predicted_is_the_probes_answer():
    assert_fits(mlp(), SAMPLE, {FITS}, precision="fp32")
    assert_fits(mlp(), SAMPLE, {TOO_BIG}, precision="fp32")
"""
    result = run_inner(pytester, body)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: batch 1000000 does not fit in 64.00 MiB of a T4's caching allocator "
            "(predicted, fp16): largest batch that fits: *, decided by step * from a *",
            f"*AssertionError: batch {TOO_BIG} does not fit in 64.00 KiB of an emulated device (predicted, "
            f"fp32): largest batch that fits: {LARGEST}*",
        ]
    )


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('gpu="V100"', "*Expected `gpu` to be one of T4, *but got 'V100'*"),
        ('"1GiB", predict="yes"', "*Expected `predict` of `@pytest.mark.memory_limit` to be True or False*"),
        (
            '"1GiB", "2GiB", gpu="T4"',
            "*to take one limit*or a card*but got memory_limit('1GiB', '2GiB', gpu='T4')*",
        ),
    ],
)
def test_bad_card_markers_error_clearly(pytester: pytest.Pytester, marker: str, message: str) -> None:
    result = run_inner(pytester, f"\n@pytest.mark.memory_limit({marker})\ndef test_bad():\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])


def test_assert_fits_predicted_needs_a_card_or_a_limit_and_no_steps() -> None:
    with pytest.raises(TypeError, match=r"assert_fits\(predict=True\) needs a card or a memory limit"):
        assert_fits(mlp(), sample(), 8, predict=True)
    with pytest.raises(ValueError, match=r"no `steps` with `predict=True`"):
        assert_fits(mlp(), sample(), 8, predict=True, gpu="T4", steps=3)
    with pytest.raises(ValueError, match=r"`predict=True` with `gpu='T4'`"):
        assert_fits(mlp(), sample(), 8, memory_limit=LIMIT, gpu="T4")


# -- DeviceLimit and the docs ----------------------------------------------------------------------


def test_device_limit_renders_and_is_frozen() -> None:
    cpu = DeviceLimit(4 * 2**30, torch.device("cpu"), emulated=True)
    assert str(cpu) == "4.00 GiB (emulated on cpu)"
    assert (
        str(DeviceLimit(2**30, torch.device("cuda", 0), emulated=False))
        == "1.00 GiB (allocator cap on cuda:0)"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.limit = 1  # type: ignore[misc]


def test_loading_the_plugin_imports_neither_torch_nor_autobatch() -> None:
    """pytest loads the plugin in every run where autobatch is installed: it must cost nothing."""
    import subprocess
    import sys

    code = (
        "import sys, pytest_autobatch; print(sorted(m for m in ('torch', 'autobatch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_assertions_never_use_the_probe_cache(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from autobatch.cache.store import ProbeCache

    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "cache"))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    X, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    assert_trains(model, (X, y), 16, memory_limit="256KiB", precision="fp32", device="cpu")
    with pytest.raises(AssertionError):
        assert_fits(model, (torch.randn(8), 1), 64, memory_limit="8KiB", precision="fp32")
    assert ProbeCache().entries() == []


def test_a_gpu_sized_limit_runs_on_the_allocator_model() -> None:
    """memory_limit markers of GPU sizes (64 MiB and up) emulate CUDA's caching allocator on the CPU."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    with memory_limit_scope("128MiB"):
        trial = assert_fits(model, (torch.randn(64), 3), 256, device="cpu", precision="fp32")
    assert trial.reserved_bytes == 2 << 20  # one small-pool segment: reserved, not live, memory
    with memory_limit_scope("8MiB"):
        small = assert_fits(model, (torch.randn(64), 3), 256, device="cpu", precision="fp32")
    assert small.reserved_bytes is None  # small emulated devices count live bytes
