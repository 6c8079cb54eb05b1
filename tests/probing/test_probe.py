"""Tests for autobatch.probe on the emulated CPU device: exactness against an exhaustive search, state
left bit-identical, caps, margin, data forms, bad arguments and determinism."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from autobatch import NoBatchFitsError, ProbeResult, probe, try_batch
from autobatch.memory.device import DeviceMemory
from autobatch.probing.prober import apply_margin
from autobatch.step.data import as_source
from autobatch.step.stepper import Stepper
from autobatch.units import parse_memory_limit
from tests.models import (
    CNN,
    MLP,
    Case,
    SequenceDataset,
    TransformerClassifier,
    case,
    limit_for,
    mlp_case,
    pad_collate,
    transformer_case,
)


def exhaustive_max(model: nn.Module, data: Any, size: int, **options: Any) -> int:
    """The largest batch whose step fits, by trying b = 1, 2, ... until the first that does not."""
    b = 1
    while b <= size and try_batch(model, data, b, **options).fitted:
        b += 1
    assert b <= size, "the limit does not bind below the dataset size: pick a smaller one"
    return b - 1


def probe_limit(c: Case, target: int, **options: Any) -> int:
    return limit_for(c.model, c.data, target, **options)


# --- exactness ----------------------------------------------------------------------------------

EXACT_CASES = (
    [
        pytest.param(name, target, kind, "fp32", True, id=f"{name}-{target}-{kind}-fp32")
        for name in ("mlp", "cnn", "transformer")
        for target in (12, 40)
        for kind in ("sgd", "adam")
    ]
    + [
        pytest.param(name, 12, "adam", "bf16", True, id=f"{name}-12-adam-bf16")
        for name in ("mlp", "cnn", "transformer")
    ]
    + [
        pytest.param("cnn", 12, "adam", "fp32", False, id="cnn-12-adam-fp32-no-accumulation"),
    ]
)


@pytest.mark.parametrize(("name", "target", "kind", "precision", "accumulate"), EXACT_CASES)
def test_probe_finds_the_exhaustive_maximum(
    name: str, target: int, kind: str, precision: str, accumulate: bool
) -> None:
    c = case(name)
    options: dict[str, Any] = {
        "optimizer": c.optimizer(kind),
        "precision": precision,
        "accumulate": accumulate,
    }
    options["memory_limit"] = probe_limit(c, target, **options)
    exact = exhaustive_max(c.model, c.data, c.size, **options)
    assert 5 <= exact < c.size

    result = probe(c.model, c.data, **options)

    assert result.micro_batch == exact
    assert result.max_fitting_batch == exact
    assert result.first_failure == exact + 1
    assert result.capped_by is None
    assert result.precision == precision
    assert result.memory_limit == options["memory_limit"]
    # The project's targets for a probe on an ideal device: the maximum and the batch above it, each
    # settled by one step, after a traced cold step and a traced steady one whose timelines predict it;
    # where samples differ in length, one or two more steps confirm the maximum on a padded (mixed) batch.
    mixed = [t for t in result.trials if t.case == "mixed"]
    assert len(mixed) == (1 if name == "transformer" else 0)
    assert [t.role for t in result.trials[:2]] == ["cold", "steady"]
    assert result.optimizer_steps <= 4 + 2 * len(mixed), [(t.batch, t.fitted) for t in result.trials]
    assert result.optimizer_steps <= 6
    assert result.ooms <= 1, [(t.batch, t.fitted) for t in result.trials]
    assert result.ooms == sum(not t.fitted for t in result.trials) >= 1
    assert result.optimizer_steps >= len(result.trials)  # a trial is one step, or a few
    fitted = [t.batch for t in result.trials if t.fitted]
    failed = [t.batch for t in result.trials if not t.fitted]
    assert max(fitted) == exact
    assert min(failed) == exact + 1


def _wide_mlp() -> nn.Module:
    """A 4 MiB first layer (a 20 MiB segment of the large pool), 1 MiB ones in the small pool."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2048, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


@pytest.mark.slow
@pytest.mark.parametrize(("limit_mib", "kind"), [(24, "sgd"), (46, "adam")])
def test_probe_finds_the_allocator_maximum(limit_mib: int, kind: str) -> None:
    """Through the model of CUDA's caching allocator: reserved memory, in 2 MiB and 20 MiB segments."""
    model = _wide_mlp()
    data = (torch.randn(512, 2048), torch.randint(0, 10, (512,)))

    def make() -> torch.optim.Optimizer:
        return (
            torch.optim.SGD(model.parameters(), lr=0.1)
            if kind == "sgd"
            else torch.optim.Adam(model.parameters())
        )

    options: dict[str, Any] = {"precision": "fp32", "memory_limit": limit_mib << 20, "emulation": "allocator"}
    b = 1
    while b <= 512 and try_batch(model, data, b, optimizer=make(), **options).fitted:
        b += 1
    exact = b - 1
    assert 5 <= exact < 512
    result = probe(model, data, optimizer=make(), **options)
    assert (result.micro_batch, result.first_failure) == (exact, exact + 1)
    assert result.limit_kind.endswith("(emulated, CUDA's caching allocator)")
    assert result.optimizer_steps <= 8 and result.ooms <= 2, [(t.batch, t.fitted) for t in result.trials]
    fitted = [t for t in result.trials if t.fitted]
    assert all(t.reserved_bytes is not None and t.reserved_bytes <= options["memory_limit"] for t in fitted)


def test_residents_that_do_not_fit_the_device_at_all_are_no_batch_fits() -> None:
    """The 4 MiB layer needs a 20 MiB segment: a 16 MiB device cannot even hold the weights."""
    with pytest.raises(NoBatchFitsError, match="Not even a batch of 1 sample fits"):
        probe(
            _wide_mlp(),
            (torch.randn(64, 2048), torch.randint(0, 10, (64,))),
            memory_limit="16MiB",
            emulation="allocator",
        )


def test_probe_batches_hold_the_longest_sequences(transformer: Case) -> None:
    """The maximum is the one of the longest samples, and a batch of that size of any samples fits."""
    options: dict[str, Any] = {"optimizer": transformer.optimizer("adam"), "precision": "fp32"}
    options["memory_limit"] = probe_limit(transformer, 12, **options)
    result = probe(transformer.model, transformer.data, **options)

    dataset = transformer.data.dataset
    longest_first = sorted(range(len(dataset)), key=lambda i: -len(dataset.samples[i]))
    longest = DataLoader(Subset(dataset, longest_first[:40]), collate_fn=pad_collate)
    # A constant size keeps the subset's order: the batch of b is the b longest sequences.
    exact = exhaustive_max(transformer.model, longest, 40, size_fn=lambda sample: 1.0, **options)
    assert result.micro_batch == exact
    assert result.first_failure == exact + 1

    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        picked = torch.randperm(len(dataset), generator=generator)[: result.micro_batch].tolist()
        anything = DataLoader(Subset(dataset, picked), collate_fn=pad_collate)
        assert try_batch(transformer.model, anything, result.micro_batch, **options).fitted

    # Ranked shortest first instead, batches of the "largest" samples seem to hold many more; the padded
    # batch that confirms the answer (the "largest" but one and the "smallest", here the longest) does not.
    shortest = probe(transformer.model, transformer.data, size_fn=lambda s: -float(len(s[0])), **options)
    assert max(t.batch for t in shortest.trials if t.fitted and t.case == "longest") > 2 * result.micro_batch
    assert shortest.micro_batch == result.micro_batch


# --- state is left bit-identical -----------------------------------------------------------------


def capture(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict:
    """Everything a probe could change, copied."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "param_ids": [(id(p), p.data_ptr()) for p in model.parameters()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [(n, m.training) for n, m in model.named_modules()],
        "optimizer": _clone(optimizer.state_dict()),
        "optimizer_keys": [id(p) for p in optimizer.state],
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def assert_identical(a: Any, b: Any, path: str = "state") -> None:
    """Equal values, tensors equal bit for bit (same dtype, shape and device too)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), path
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class FailingCNN(CNN):
    """A CNN whose forward raises a ValueError of its own above ``fail_above`` samples."""

    fail_above: int | None = None
    raised: list[BaseException]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_above is not None and x.shape[0] > self.fail_above:
            error = ValueError(f"custom failure at batch {x.shape[0]}")
            self.raised.append(error)
            raise error
        return super().forward(x)


@contextmanager
def rich_state(optimizer_state: str, mode: str) -> Iterator[SimpleNamespace]:
    """A CNN with a frozen layer, two param groups, a GradScaler with history, seeded RNGs."""
    torch.manual_seed(0)
    model = FailingCNN()
    model.raised = []
    model.features[0].requires_grad_(False)  # a frozen conv
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(128, 3, 16, 16, generator=g), torch.randint(0, 10, (128,), generator=g)
    optimizer = torch.optim.Adam(
        [
            {"params": model.features[1].parameters(), "lr": 1e-2, "weight_decay": 0.1},
            {"params": model.head.parameters(), "lr": 3e-4},
        ],
        betas=(0.8, 0.95),
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    if optimizer_state == "warm":
        for i in range(2):  # real steps: Adam moments, BatchNorm statistics, the scaler's tracker
            loss = nn.functional.cross_entropy(model(X[i * 16 : (i + 1) * 16]), y[i * 16 : (i + 1) * 16])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        # Leave gradients behind, as a user between backward and step would.
        nn.functional.cross_entropy(model(X[:4]), y[:4]).backward()
        assert len(optimizer.state) > 0
    if mode == "eval":
        model.eval()
    else:
        model.train()
        model.features[4].eval()  # the Dropout alone in eval mode
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    yield SimpleNamespace(model=model, optimizer=optimizer, scaler=scaler, data=(X, y))


SCENARIOS = ["success", "ooms", "step_fn_error", "forward_error", "error_after_oom"]


@pytest.mark.parametrize("mode", ["eval", "mixed"])
@pytest.mark.parametrize("optimizer_state", ["warm", "empty"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_state_is_bit_identical_after_probe(scenario: str, optimizer_state: str, mode: str) -> None:
    with rich_state(optimizer_state, mode) as s:
        options: dict[str, Any] = {"optimizer": s.optimizer, "scaler": s.scaler, "precision": "fp32"}
        options["memory_limit"] = limit_for(s.model, s.data, 12, **options)
        raised: list[BaseException] = []
        tried: list[int] = []
        ooms: list[int] = []

        def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
            x, target = batch
            n = x.shape[0]
            if (scenario == "step_fn_error" and len(tried) == 2) or (scenario == "error_after_oom" and ooms):
                raised.append(ValueError(f"custom failure at batch {n}"))
                raise raised[-1]
            if scenario == "error_after_oom" and len(tried) == 4:  # the first trial after the two traced ones
                ooms.append(n)
                raise torch.OutOfMemoryError(f"injected at batch {n}")
            tried.append(n)
            return nn.functional.cross_entropy(model(x), target)

        if scenario in ("step_fn_error", "error_after_oom"):
            options["step_fn"] = step_fn
        if scenario == "forward_error":
            s.model.fail_above = 3
        if scenario == "success":
            options["max_batch"] = 8
        before = capture(s.model, s.optimizer, s.scaler)

        if scenario in ("success", "ooms"):
            result = probe(s.model, s.data, **options)
            assert result.ooms == 0 if scenario == "success" else result.ooms >= 1
        else:
            with pytest.raises(ValueError, match="custom failure") as excinfo:
                probe(s.model, s.data, **options)
            errors = raised or s.model.raised
            assert len(errors) == 1
            assert excinfo.value is errors[0]
            assert type(excinfo.value) is ValueError

        s.model.fail_above = None
        assert_identical(before, capture(s.model, s.optimizer, s.scaler))


class Counting(nn.Module):
    """An MLP whose forward reassigns a buffer out of place, as ``self.seen = self.seen + n`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = self.seen + x.shape[0]
        return self.net(x)


def test_a_buffer_that_forward_reassigns_is_put_back() -> None:
    model = Counting()
    seen = model.seen
    probe(model, (X32, Y10), memory_limit="1MiB", precision="fp32", cache=False)
    assert model.seen is seen and int(model.seen) == 0
    assert dict(model.named_buffers()) == {"seen": seen}


def test_pending_gradients_survive_a_probe() -> None:
    """A user mid-accumulation (gradients of earlier micro-batches pending) can probe in between."""
    model = MLP()
    nn.functional.cross_entropy(model(X32[:4]), Y10[:4]).backward()
    pending = {n: p.grad.clone() for n, p in model.named_parameters()}
    probe(model, (X32, Y10), memory_limit="1MiB", precision="fp32", cache=False)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, pending[name]), name


class Augmenting(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Draws from the global generators on every read, as random augmentation does."""

    def __len__(self) -> int:
        return len(X32)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        random.random()
        np.random.rand()
        return X32[i] + 0.01 * torch.rand(X32.shape[1]), Y10[i]


@pytest.mark.parametrize("cache", [True, False])
def test_reading_samples_does_not_consume_the_generators(cache: bool) -> None:
    model = MLP()  # its initialisation draws from the generator: made first
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    probe(model, Augmenting(), memory_limit="1MiB", precision="fp32", cache=cache)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert_identical(np.random.get_state(), states[2])


def test_a_user_grad_scaler_keeps_its_stage_and_the_optimizer_its_groups() -> None:
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = list(optimizer.param_groups)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(nn.functional.cross_entropy(model(X32[:4]), Y10[:4])).backward()
    scaler.unscale_(optimizer)  # mid-step: the scaler remembers this optimizer's gradients are unscaled
    stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
    probe(model, (X32, Y10), optimizer=optimizer, scaler=scaler, memory_limit="1MiB", precision="fp32")
    assert scaler._per_optimizer_states[id(optimizer)]["stage"] is stage
    assert all(a is b for a, b in zip(optimizer.param_groups, groups, strict=True))
    scaler.step(optimizer)  # the user's step goes on where it was
    scaler.update()


def test_non_oom_errors_propagate_unchanged() -> None:
    torch.manual_seed(0)
    model = MLP(in_features=31)  # the data has 32 features: a shape error in the first Linear
    X, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="cannot be multiplied") as excinfo:
        probe(model, (X, y), memory_limit="1GiB", precision="fp32")
    assert type(excinfo.value) is RuntimeError  # not swallowed, not turned into NoBatchFitsError
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))


def test_collate_errors_propagate() -> None:
    # Variable-length sequences with the default collate: torch.stack fails, which is no OOM.
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        probe(TransformerClassifier(), SequenceDataset(50), memory_limit="1GiB", precision="fp32")


def test_no_batch_fits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))  # ~270 KB of weights
    X, y = torch.randn(32, 256), torch.randint(0, 10, (32,))
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NoBatchFitsError, match=r"64\.00 KiB.*of model state") as excinfo:
        probe(model, (X, y), memory_limit="64KiB", precision="fp32")
    error = excinfo.value
    assert error.memory_limit == 64 * 1024
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert error.model_state_bytes is not None and error.model_state_bytes >= param_bytes
    assert "precision='bf16'" in str(error)
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


# --- caps, margin, rounding, output ---------------------------------------------------------------


def test_dataset_size_caps_the_probe() -> None:
    c = mlp_case(n=20)
    result = probe(c.model, c.data, memory_limit="1GiB", precision="fp32")
    assert result.micro_batch == result.max_fitting_batch == 20
    assert result.capped_by == "dataset"
    assert result.first_failure is None
    assert result.ooms == 0
    assert any(t.batch == 20 and t.fitted for t in result.trials)


def test_max_batch_caps_the_probe_and_is_tested(mlp: Case) -> None:
    result = probe(mlp.model, mlp.data, memory_limit="1GiB", precision="fp32", max_batch=50)
    assert result.micro_batch == 50
    assert result.capped_by == "max_batch"
    assert result.first_failure is None
    assert any(t.batch == 50 and t.fitted for t in result.trials)
    assert max(t.batch for t in result.trials) == 50


def test_max_batch_above_the_dataset_size_is_a_dataset_cap() -> None:
    c = mlp_case(n=20)
    result = probe(c.model, c.data, memory_limit="1GiB", precision="fp32", max_batch=1000)
    assert result.micro_batch == 20
    assert result.capped_by == "dataset"


def test_max_batch_above_the_maximum_does_not_cap(mlp: Case) -> None:
    options: dict[str, Any] = {"precision": "fp32", "optimizer": mlp.optimizer("sgd")}
    options["memory_limit"] = probe_limit(mlp, 12, **options)
    free = probe(mlp.model, mlp.data, **options)
    capped = probe(mlp.model, mlp.data, max_batch=free.micro_batch + 5, **options)
    assert capped.micro_batch == free.micro_batch
    assert capped.capped_by is None
    assert capped.first_failure == free.first_failure


def test_margin_and_multiple_of(mlp: Case) -> None:
    options: dict[str, Any] = {"precision": "fp32", "optimizer": mlp.optimizer("adam")}
    options["memory_limit"] = probe_limit(mlp, 40, **options)
    exact = exhaustive_max(mlp.model, mlp.data, mlp.size, **options)
    result = probe(mlp.model, mlp.data, margin=0.1, multiple_of=8, **options)
    assert result.max_fitting_batch == exact
    assert result.first_failure == exact + 1
    assert result.micro_batch == apply_margin(exact, 0.1, 8)
    assert result.micro_batch % 8 == 0 and result.micro_batch <= 0.9 * exact
    assert (result.margin, result.multiple_of) == (0.1, 8)


@pytest.mark.parametrize(
    ("exact", "margin", "multiple_of", "expected"),
    [
        (100, 0.1, 8, 88),
        (100, 0.0, 1, 100),
        (5, 0.0, 8, 5),
        (1, 0.5, 1, 1),
        (64, 0.0, 8, 64),
        (17, 0.0, 8, 16),
    ],
)
def test_apply_margin(exact: int, margin: float, multiple_of: int, expected: int) -> None:
    assert apply_margin(exact, margin, multiple_of) == expected


def test_result_is_json_ready_and_renders(mlp: Case) -> None:
    options: dict[str, Any] = {"precision": "fp32"}
    options["memory_limit"] = probe_limit(mlp, 12, **options)
    result = probe(mlp.model, mlp.data, **options)
    assert isinstance(result, ProbeResult)
    loaded = json.loads(json.dumps(result.to_dict()))
    assert loaded["micro_batch"] == result.micro_batch
    assert loaded["first_failure"] == result.first_failure
    assert [t["batch"] for t in loaded["trials"]] == [t.batch for t in result.trials]
    assert "micro-batch" in result.summary()

    from rich.console import Console

    console = Console(record=True, width=120, file=io.StringIO())
    console.print(result)
    text = console.export_text()
    assert "micro-batch" in text
    assert "OOM" in text


# --- data forms ------------------------------------------------------------------------------------


class VectorDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The tensors ``(X, y)`` of a case as a plain map-style Dataset."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X[i], self.y[i]


def test_a_dataset_probes_like_its_tensors(mlp: Case) -> None:
    options: dict[str, Any] = {"precision": "fp32"}
    options["memory_limit"] = probe_limit(mlp, 12, **options)
    from_tensors = probe(mlp.model, mlp.data, **options)
    from_dataset = probe(mlp.model, VectorDataset(*mlp.data), **options)
    assert from_dataset.micro_batch == from_tensors.micro_batch
    assert from_dataset.first_failure == from_tensors.first_failure


def test_a_dataloader_collate_fn_is_used() -> None:
    c = transformer_case(n=60)
    calls: list[int] = []

    def collate(samples: list[Any]) -> Any:
        calls.append(len(samples))
        return pad_collate(samples)

    loader = DataLoader(c.data.dataset, batch_size=4, collate_fn=collate)
    result = probe(c.model, loader, memory_limit="1GiB", precision="fp32", max_batch=16)
    assert result.micro_batch == 16
    assert 16 in calls


class DictDataset(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 128) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 32, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.labels[i]}


class HFStyle(nn.Module):
    """Takes ``model(**batch)`` and returns its loss in an object or a dict, as Hugging Face models do."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output
        self.body = MLP()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> Any:
        logits = self.body(x)
        loss = nn.functional.cross_entropy(logits, labels)
        if self.output == "object":
            return SimpleNamespace(loss=loss, logits=logits)
        if self.output == "dict":
            return {"loss": loss, "logits": logits}
        return {"logits": logits}


@pytest.mark.parametrize("output", ["object", "dict"])
def test_dict_batches_with_a_loss_output(output: str) -> None:
    torch.manual_seed(0)
    model, data = HFStyle(output), DictDataset()
    options: dict[str, Any] = {"precision": "fp32"}
    options["memory_limit"] = limit_for(model, data, 12, **options)
    result = probe(model, data, **options)
    assert result.first_failure == result.micro_batch + 1
    assert try_batch(model, data, result.micro_batch, **options).fitted
    assert not try_batch(model, data, result.micro_batch + 1, **options).fitted


def test_dict_output_without_loss_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"loss.*step_fn"):
        probe(HFStyle("no loss"), DictDataset(), memory_limit="1GiB", precision="fp32")


def test_step_fn_escape_hatch() -> None:
    torch.manual_seed(0)
    autoencoder = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 32))
    X = torch.randn(128, 32)
    sizes: list[int] = []

    def step_fn(model: nn.Module, batch: tuple[torch.Tensor]) -> torch.Tensor:
        (x,) = batch
        sizes.append(x.shape[0])
        return nn.functional.mse_loss(model(x), x)

    options: dict[str, Any] = {"precision": "fp32", "step_fn": step_fn}
    options["memory_limit"] = limit_for(autoencoder, (X,), 12, **options)
    sizes.clear()
    result = probe(autoencoder, (X,), **options)
    # Each step runs two micro-steps by default (the second adds onto the first's gradients); here every
    # trial is one step: the traced cold and steady ones, then the maximum and the batch above it.
    assert sizes == [b for b in [t.batch for t in result.trials] for _ in range(2)]
    assert result.optimizer_steps == len(result.trials) == 4
    assert result.first_failure == result.micro_batch + 1
    assert try_batch(autoencoder, (X,), result.micro_batch, **options).fitted
    assert not try_batch(autoencoder, (X,), result.micro_batch + 1, **options).fitted


# --- bad arguments -------------------------------------------------------------------------------

X32, Y10 = torch.randn(16, 32), torch.randint(0, 10, (16,))


def _frozen() -> nn.Module:
    return MLP().requires_grad_(False)


BAD_ARGUMENTS: list[Any] = [
    pytest.param({"memory_limit": "lots"}, ValueError, "memory_limit", id="memory_limit-string"),
    pytest.param({"memory_limit": 1.5}, TypeError, "memory_limit", id="memory_limit-float"),
    pytest.param({"memory_limit": 0}, ValueError, "memory_limit", id="memory_limit-zero"),
    pytest.param({"margin": 1.5}, ValueError, "margin", id="margin-above-1"),
    pytest.param({"margin": -0.1}, ValueError, "margin", id="margin-negative"),
    pytest.param({"margin": True}, TypeError, "margin", id="margin-bool"),
    pytest.param({"multiple_of": 0}, ValueError, "multiple_of", id="multiple_of-zero"),
    pytest.param({"multiple_of": 2.0}, TypeError, "multiple_of", id="multiple_of-float"),
    pytest.param({"max_batch": -1}, ValueError, "max_batch", id="max_batch-negative"),
    pytest.param({"max_batch": "10"}, TypeError, "max_batch", id="max_batch-string"),
    pytest.param({"precision": "fp8"}, ValueError, "precision", id="precision-unknown"),
    pytest.param({"device": "meta"}, ValueError, "device", id="device-mismatch"),
    pytest.param({"device": 0}, TypeError, "device", id="device-int"),
    pytest.param(
        {"optimizer": torch.optim.SGD(MLP().parameters(), lr=0.1)},
        ValueError,
        "optimizer",
        id="optimizer-of-another-model",
    ),
    pytest.param({"optimizer": "adam"}, TypeError, "optimizer", id="optimizer-string"),
    pytest.param({"model": _frozen()}, ValueError, "model", id="model-without-trainable-params"),
    pytest.param({"model": lambda x: x}, TypeError, "model", id="model-not-a-module"),
    pytest.param({"data": (X32,)}, ValueError, "data", id="data-without-labels"),
    pytest.param({"data": (X32[:0], Y10[:0])}, ValueError, "data", id="data-empty"),
    pytest.param({"data": (X32, Y10[:8])}, ValueError, "data", id="data-length-mismatch"),
    pytest.param({"data": 5}, TypeError, "data", id="data-not-data"),
]


@pytest.mark.parametrize(("override", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments(override: dict[str, Any], error: type[Exception], match: str) -> None:
    arguments: dict[str, Any] = {"model": MLP(), "data": (X32, Y10), "memory_limit": "1GiB"}
    arguments.update(override)
    with pytest.raises(error, match=f"`{match}`"):
        probe(arguments.pop("model"), arguments.pop("data"), **arguments)


def test_try_batch_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"try_batch\(\) got an unexpected keyword argument `max_batch`"):
        try_batch(MLP(), (X32, Y10), 4, max_batch=8)
    with pytest.raises(ValueError, match=r"`batch_size`.*at most the dataset size 16"):
        try_batch(MLP(), (X32, Y10), 17, memory_limit="1GiB")
    with pytest.raises(ValueError, match="`batch_size`"):
        try_batch(MLP(), (X32, Y10), 0)


# --- determinism -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_same_probe_twice_gives_identical_trials(name: str) -> None:
    c = case(name)
    options: dict[str, Any] = {"precision": "fp32", "optimizer": c.optimizer("adam")}
    options["memory_limit"] = probe_limit(c, 12, **options)

    def trials(result: ProbeResult) -> list[tuple[Any, ...]]:
        return [(t.batch, t.fitted, t.peak_bytes, t.backward_peak_bytes) for t in result.trials]

    first = probe(c.model, c.data, **options)
    second = probe(c.model, c.data, **options)
    assert trials(first) == trials(second)
    assert (first.fixed_bytes, first.bytes_per_sample) == (second.fixed_bytes, second.bytes_per_sample)
    assert first.model_state_bytes == second.model_state_bytes


# --- a real GPU --------------------------------------------------------------------------------------


class WideCNN(nn.Module):
    """Large activations per sample (64 channels at 64x64), so that 1 GiB holds a few hundred samples."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_probe_then_train_under_the_same_cap() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda", torch.cuda.current_device())
    model = WideCNN().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(2048, 3, 64, 64, generator=g), torch.randint(0, 10, (2048,), generator=g)

    result = probe(model, (X, y), optimizer=optimizer, memory_limit="1GiB", device="cuda")
    assert result.capped_by is None, result.summary()  # the limit binds
    assert result.first_failure == result.max_fitting_batch + 1

    memory = DeviceMemory(device, parse_memory_limit("1GiB"))
    assert not memory.emulated
    stepper = Stepper(model, optimizer, memory, result.precision)
    source = as_source((X, y))
    order = torch.randperm(len(source), generator=g).tolist()
    torch.cuda.reset_peak_memory_stats(device)
    with memory.capped():
        for step in range(20):
            start = (step * result.micro_batch) % (len(source) - result.micro_batch)
            stepper.backward(source.batch(order[start : start + result.micro_batch]))
            stepper.step()
        torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated(device) <= parse_memory_limit("1GiB")  # type: ignore[operator]


# -- BatchNorm cannot train on one sample ---------------------------------------------------------


def _batchnorm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))


def test_batchnorm_model_is_probed_from_batch_two_and_matches_exhaustive() -> None:
    model = _batchnorm_mlp()
    data = (torch.randn(256, 16), torch.randint(0, 4, (256,)))
    result = probe(model, data, memory_limit="64KiB", precision="fp32", device="cpu")
    assert min(t.batch for t in result.trials) >= 2  # batch 1 raises in BatchNorm1d's training mode
    exact = result.max_fitting_batch
    fits = [
        try_batch(model, data, b, memory_limit="64KiB", precision="fp32").fitted for b in (exact, exact + 1)
    ]
    assert fits == [True, False]


def test_batchnorm_model_that_cannot_fit_two_names_batch_two() -> None:
    data = (torch.randn(64, 16), torch.randint(0, 4, (64,)))
    with pytest.raises(NoBatchFitsError, match="batch of 2 samples"):
        probe(_batchnorm_mlp(), data, memory_limit="8KiB", precision="fp32", device="cpu")
