"""Tests for autobatch.TrainStep: one exact optimizer step of the user's own loop, in micro-batches that fit.

Every test runs a tiny model on the CPU under an emulated memory limit in KiB, and compares the weights
with a reference trained the plain way: one full-batch fp32 step per batch, no autobatch.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import autobatch
from autobatch import Backoff, NonFiniteLossError, OptimizerStepError, ProbeResult, StepReport, TrainStep
from autobatch.cache.store import ENV_VAR
from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.training.runner import StepRunner

torch.set_num_threads(1)

FEATURES, CLASSES = 8, 3
SGD_LIMIT = "64KiB"  # the MLP with SGD: 32 samples do not fit in one micro-batch, 11 do (11 + 11 + 10)
ADAMW_LIMIT = "88KiB"  # the MLP with AdamW, whose moments take their memory too: again 11
PROBED = 11
EXACT = 1e-5  # the largest relative error (per tensor) of weights that count as equal


# -- models, data and the plain-PyTorch reference ---------------------------------------------------


def mlp(seed: int = 0) -> nn.Module:
    """8 → 256 → 3: activations wide enough that a few KiB decide the micro-batch."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 256), nn.Tanh(), nn.Linear(256, CLASSES))


def data(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def batches(n: int = 128, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    X, y = data(n)
    return [(X[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def sgd(model: nn.Module, lr: float = 0.5) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> TrainStep:
    """A TrainStep on the CPU in fp32 under the SGD limit, unless told otherwise."""
    defaults: dict[str, Any] = {"precision": "fp32", "device": "cpu"}
    if "micro_batch" not in options:
        defaults["memory_limit"] = SGD_LIMIT
    return TrainStep(model, optimizer, **{**defaults, **options})


def reference_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, ...],
    *,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    grad_clip: float | None = None,
) -> float:
    """The plain full-batch fp32 step: forward and backward of the whole batch, clip, step, zero."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(batch[0]), batch[1])
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def relative_error(model: nn.Module, expected: nn.Module | dict[str, torch.Tensor]) -> float:
    """The largest ``‖a - b‖ / ‖b‖`` over the tensors of two models' states."""
    ours = weights(model)
    theirs = expected if isinstance(expected, dict) else weights(expected)
    assert ours.keys() == theirs.keys()
    return max(float((ours[k] - theirs[k]).norm() / theirs[k].norm()) for k in theirs)


def optimizer_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    """A counter of ``optimizer.step()`` calls (the probe's trials call it too)."""
    count = [0]
    optimizer.register_step_post_hook(lambda *args: count.__setitem__(0, count[0] + 1))
    return count


class Faults:
    """A ``step_fn`` (cross-entropy) that raises ``torch.OutOfMemoryError`` on chosen calls, counted from
    when :meth:`arm` was called, or returns a NaN loss on poisoned ones."""

    def __init__(self) -> None:
        self.calls = 0
        self.oom_on: set[int] = set()
        self.nan_on: set[int] = set()
        self.injected = 0

    def arm(self, *after: int) -> None:
        """Run out of memory on the ``after``-th calls from now (1-based)."""
        self.oom_on |= {self.calls + a for a in after}

    def poison(self, *after: int) -> None:
        self.nan_on |= {self.calls + a for a in after}

    def step_fn(self, model: nn.Module, batch: Any) -> torch.Tensor:
        self.calls += 1
        loss = F.cross_entropy(model(batch[0]), batch[1])
        if self.calls in self.oom_on:
            self.injected += 1
            raise torch.OutOfMemoryError(f"injected at call {self.calls}")  # after forward: memory held
        return loss * float("nan") if self.calls in self.nan_on else loss


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test caches its probes under its own tmp_path, never in the real home cache."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(ENV_VAR, str(directory))
    return directory


# -- exact gradients --------------------------------------------------------------------------------


def test_one_call_is_one_exact_sgd_step_over_a_batch_that_does_not_fit() -> None:
    model, reference = mlp(), mlp()
    batch = batches()[0]
    step = make_step(model, sgd(model))

    report = step(batch)
    expected_loss = reference_step(reference, sgd(reference), batch)

    assert step.result is not None and step.result.max_fitting_batch < 32  # the batch had to be split
    assert report.micro_batches == (11, 11, 10) and step.micro_batch == PROBED
    assert report.applied and report.backoffs == () and step.steps == 1
    assert relative_error(model, reference) <= EXACT
    assert report.loss == pytest.approx(expected_loss, rel=1e-6)
    assert all(p.grad is None for p in model.parameters()), "gradients are set to None after the step"


def test_the_exactness_check_fails_for_micro_losses_weighted_equally(monkeypatch: pytest.MonkeyPatch) -> None:
    """1/3 each for 11 + 11 + 10 is not the batch's mean: the check above can fail."""
    model, reference = mlp(), mlp()
    batch = batches()[0]
    monkeypatch.setattr(StepRunner, "_weights", lambda self, parts, samples, counts: [1 / len(parts)] * 3)
    make_step(model, sgd(model))(batch)
    reference_step(reference, sgd(reference), batch)
    assert relative_error(model, reference) > 10 * EXACT


def test_adamw_steps_with_grad_clip_are_exact_over_split_batches() -> None:
    clip = 0.05
    model, reference, unclipped = mlp(), mlp(), mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    unclipped_optimizer = torch.optim.AdamW(unclipped.parameters(), lr=1e-2, weight_decay=0.1)
    step = make_step(model, optimizer, memory_limit=ADAMW_LIMIT, grad_clip=clip)

    for batch in batches():
        report = step(batch)
        assert report.micro_batches == (11, 11, 10)
        reference_step(reference, ref_optimizer, batch, grad_clip=clip)
        reference_step(unclipped, unclipped_optimizer, batch)
        assert relative_error(model, reference) <= EXACT

    assert relative_error(unclipped, reference) > 1e-3, "the clip did clip: the test can tell"
    assert step.steps == 4 and step.backoffs == []


@pytest.mark.parametrize("form", ["dict", "list", "with-ids"])
def test_a_batch_of_another_structure_is_probed_from_its_samples_and_cut_exactly(form: str) -> None:
    """A dict, a list, or a tuple that carries a list of string ids: each part is cut at the same bounds."""
    X, y = batches()[0]
    batch: Any = {
        "dict": {"x": X, "y": y},
        "list": [X, y],
        "with-ids": (X, y, [f"sample-{i}" for i in range(32)]),
    }[form]
    seen: list[str] = []

    def step_fn(model: nn.Module, part: Any) -> torch.Tensor:
        x, target = (part["x"], part["y"]) if isinstance(part, dict) else (part[0], part[1])
        if form == "with-ids":
            assert len(part[2]) == len(x)
            seen.extend(part[2])
        return F.cross_entropy(model(x), target)

    model, reference = mlp(), mlp()
    step = make_step(model, sgd(model), step_fn=step_fn)
    report = step(batch)
    reference_step(reference, sgd(reference), (X, y))

    assert step.result is not None and report.micro_batches == (11, 11, 10)
    assert relative_error(model, reference) <= EXACT
    if form == "with-ids":
        assert seen[-32:] == [f"sample-{i}" for i in range(32)]  # the step (after the probe): each id once


# -- an epoch of the user's own loop ----------------------------------------------------------------


def epoch_loader(n: int) -> DataLoader[Any]:
    """The user's loader: shuffled, batches of 32, the last one short."""
    return DataLoader(
        TensorDataset(*data(n)), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5)
    )


def test_an_epoch_with_a_short_last_batch_equals_full_batch_training() -> None:
    n = 122  # 32 + 32 + 32 + 26
    model, reference = mlp(), mlp()
    optimizer, ref_optimizer = sgd(model), sgd(reference)
    step = make_step(model, optimizer)

    reports = [step((xb, yb)) for xb, yb in epoch_loader(n)]
    losses = [reference_step(reference, ref_optimizer, (xb, yb)) for xb, yb in epoch_loader(n)]

    assert [r.micro_batches for r in reports] == [(11, 11, 10)] * 3 + [(9, 9, 8)]  # the last: its own plan
    assert step.steps == 4 and all(r.applied and not r.backoffs for r in reports)
    assert [r.loss for r in reports] == pytest.approx(losses, rel=1e-5)
    assert relative_error(model, reference) <= EXACT


def test_an_oom_mid_epoch_backs_off_and_redoes_the_step_exactly() -> None:
    n = 122
    faults = Faults()
    model, reference = mlp(), mlp()
    optimizer, ref_optimizer = sgd(model), sgd(reference)
    step = make_step(model, optimizer, step_fn=faults.step_fn)
    steps = optimizer_steps(optimizer)
    reports: list[StepReport] = []

    for index, (xb, yb) in enumerate(epoch_loader(n)):
        if index in (1, 3):  # the second micro-step of the second and of the last step
            faults.arm(2)
        before = steps[0]
        reports.append(step((xb, yb)))
        if index:
            assert steps[0] == before + 1, "one optimizer step per call, also when redone"
    for xb, yb in epoch_loader(n):
        reference_step(reference, ref_optimizer, (xb, yb))

    assert faults.injected == 2
    (first,) = reports[1].backoffs
    assert (first.step, first.from_micro) == (1, PROBED) and first.to_micro < PROBED
    assert max(reports[1].micro_batches) <= first.to_micro and sum(reports[1].micro_batches) == 32
    (second,) = reports[3].backoffs
    assert second.step == 3 and sum(reports[3].micro_batches) == 26
    assert reports[0].backoffs == reports[2].backoffs == ()
    assert step.backoffs == [first, second], "the step keeps every back-off"
    assert relative_error(model, reference) <= EXACT


def test_the_back_off_warning_shows_the_plan_the_step_is_redone_with(
    caplog: pytest.LogCaptureFixture,
) -> None:
    faults = Faults()
    model = mlp()
    step = make_step(model, sgd(model), step_fn=faults.step_fn)
    step(batches()[0])
    faults.arm(2)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        (backoff,) = step(batches()[1]).backoffs
    (warning,) = [r.getMessage() for r in caplog.records if "out of memory at micro-batch" in r.getMessage()]
    assert backoff.to_micro == 10  # measured: 11 needed 60.5 of 64 KiB
    assert warning.endswith("plan 8 × 4 steps (micro ≤ 10) × 1 rank = 32"), warning


def test_a_micro_batch_given_too_large_runs_out_of_the_emulated_memory_and_backs_off() -> None:
    model, reference = mlp(), mlp()
    step = make_step(model, sgd(model), micro_batch=32, memory_limit=SGD_LIMIT)
    batch = batches()[0]

    report = step(batch)
    reference_step(reference, sgd(reference), batch)

    # The emulated device refused 32; one back-off, measured: halving to 16 would run out again.
    (backoff,) = report.backoffs
    assert backoff == Backoff(epoch=0, step=0, from_micro=32, to_micro=backoff.to_micro)
    assert PROBED <= backoff.to_micro < 16 and step.micro_batch == backoff.to_micro
    assert sum(report.micro_batches) == 32 and len(report.micro_batches) > 1
    assert relative_error(model, reference) <= EXACT


class Tagger(nn.Module):
    """Embedding → tanh → linear: logits for every token; its memory grows with the sequence length."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def test_longer_samples_later_run_out_of_the_emulated_memory_and_the_step_is_redone() -> None:
    """Probed on short sequences, the micro-batch does not fit a batch of long ones: the device says so."""
    g = torch.Generator().manual_seed(0)
    lengths = [4, 16, 4]
    epoch = [
        (torch.randint(0, 20, (32, t), generator=g), torch.randint(0, 5, (32, t), generator=g))
        for t in lengths
    ]
    model, reference = Tagger(), Tagger()
    optimizer, ref_optimizer = sgd(model), sgd(reference)
    step = make_step(model, optimizer, loss_fn=token_loss, memory_limit="40KiB")

    reports = [step(batch) for batch in epoch]
    for batch in epoch:
        reference_step(reference, ref_optimizer, batch, loss_fn=token_loss)

    assert reports[0].micro_batches == (16, 16) and not reports[0].backoffs
    (backoff,) = reports[1].backoffs
    assert (backoff.step, backoff.from_micro) == (1, 16) and backoff.to_micro < 16
    assert sum(reports[1].micro_batches) == 32 and max(reports[1].micro_batches) <= backoff.to_micro
    assert reports[2].backoffs == () and step.backoffs == [backoff]
    assert relative_error(model, reference) <= EXACT


# -- out of memory in the optimizer step ------------------------------------------------------------


def oom_in_adam_state_init(times: int) -> tuple[Callable[..., Any], list[int]]:
    """Adam's ``_init_group`` runs out of memory ``times`` times: before anything changed."""
    real = torch.optim.Adam._init_group
    fired = [0]

    def init_group(self: Any, *args: Any, **kwargs: Any) -> Any:
        if fired[0] < times:
            fired[0] += 1
            raise torch.OutOfMemoryError("injected in Adam's state initialisation")
        return real(self, *args, **kwargs)

    return init_group, fired


def test_an_optimizer_step_that_changed_nothing_is_tried_again_and_applied_once() -> None:
    model, reference = mlp(), mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    step = make_step(model, optimizer, micro_batch=PROBED)
    first, second = batches()[:2]
    step(first)
    reference_step(reference, ref_optimizer, first)

    init_group, fired = oom_in_adam_state_init(1)
    with mock.patch.object(torch.optim.Adam, "_init_group", init_group):
        report = step(second)
    reference_step(reference, ref_optimizer, second)

    assert fired == [1] and report.applied and report.backoffs == ()
    assert step.steps == 2 and int(optimizer.state[model[0].weight]["step"]) == 2, "applied once"
    assert relative_error(model, reference) <= EXACT


def test_an_optimizer_step_that_never_fits_raises_with_nothing_applied() -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = make_step(model, optimizer, micro_batch=PROBED)
    before = weights(model)
    init_group, _ = oom_in_adam_state_init(2)
    with (
        mock.patch.object(torch.optim.Adam, "_init_group", init_group),
        pytest.raises(OptimizerStepError, match="nothing of the step was applied") as caught,
    ):
        step(batches()[0])
    assert caught.value.partial is False and caught.value.step == 1
    assert relative_error(model, before) == 0.0 and step.steps == 0


def test_an_optimizer_step_that_updated_part_of_the_model_raises_partial() -> None:
    model = mlp()
    before = weights(model)
    step = make_step(model, torch.optim.SGD(model.parameters(), lr=0.5, foreach=False), micro_batch=PROBED)
    sgd_module = importlib.import_module("torch.optim.sgd")
    real = sgd_module._single_tensor_sgd

    def half_sgd(
        params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[Any], *a: Any, **k: Any
    ) -> Any:
        real(params[:1], grads[:1], bufs[:1], *a, **k)  # the first parameter is updated...
        raise torch.OutOfMemoryError("injected half-way through SGD")  # ...then memory runs out

    with (
        mock.patch.object(sgd_module, "_single_tensor_sgd", half_sgd),
        pytest.raises(OptimizerStepError, match="after it had begun to update") as caught,
    ):
        step(batches()[0])
    assert caught.value.partial is True and caught.value.step == 1
    after = weights(model)
    assert not torch.equal(after["0.weight"], before["0.weight"]), "the first parameter moved..."
    assert all(torch.equal(after[k], before[k]) for k in ("0.bias", "2.weight", "2.bias")), "...only it"
    assert step.steps == 0


# -- non-finite losses ------------------------------------------------------------------------------


def test_a_non_finite_loss_skips_the_step_and_five_in_a_row_raise() -> None:
    faults = Faults()
    model = mlp()
    optimizer = sgd(model)
    step = make_step(model, optimizer, micro_batch=PROBED, step_fn=faults.step_fn)
    data_batches = batches(256)
    assert step(data_batches[0]).applied
    applied = weights(model)

    faults.poison(2)  # the second micro-step of the next call
    report = step(data_batches[1])
    assert not report.applied and math.isnan(report.loss) and math.isnan(float(report))
    assert relative_error(model, applied) == 0.0, "nothing of a skipped step is applied"
    assert step.steps == 2

    assert step(data_batches[2]).applied  # a clean step ends the run of non-finite ones
    applied = weights(model)
    faults.poison(*range(1, 100))
    for index in range(3, 7):
        assert not step(data_batches[index]).applied
    with pytest.raises(NonFiniteLossError, match=r"5 optimizer steps in a row \(steps 4-8\)") as caught:
        step(data_batches[7])
    assert (caught.value.first_step, caught.value.steps) == (4, 5)
    assert relative_error(model, applied) == 0.0


# -- the micro-batch: probed on the first call, beforehand, or given ---------------------------------


def test_the_first_call_probes_the_batchs_own_samples() -> None:
    model = mlp()
    optimizer = sgd(model)
    steps = optimizer_steps(optimizer)
    step = make_step(model, optimizer)
    assert step.result is None and step.micro_batch is None

    first = step(batches()[0])
    assert isinstance(step.result, ProbeResult) and step.result.micro_batch == PROBED
    assert step.result.memory_limit == 64 * 1024 and step.result.precision == "fp32"
    assert steps[0] > 1, "the probe's trials ran optimizer steps of their own"
    assert first.micro_batches == (11, 11, 10)

    before = steps[0]
    step(batches()[1])
    assert steps[0] == before + 1, "probed once: the second call runs its step only"


@pytest.mark.parametrize("given", ["dataset", "tensors", "loader"])
def test_probe_beforehand_on_a_dataset_means_no_probe_on_the_first_call(given: str) -> None:
    X, y = data(256)
    source: Any = {
        "dataset": TensorDataset(X, y),
        "tensors": (X, y),
        "loader": DataLoader(TensorDataset(X, y), batch_size=32),
    }[given]
    model = mlp()
    optimizer = sgd(model)
    step = make_step(model, optimizer)
    steps = optimizer_steps(optimizer)

    result = step.probe(source, target_batch=32)
    assert steps[0] > 1 and result.micro_batch == PROBED
    assert step.result is result and step.micro_batch == PROBED

    before = steps[0]
    report = step(batches()[0])
    assert steps[0] == before + 1, "no probe on the first call"
    assert report.micro_batches == (11, 11, 10)


def test_probe_beforehand_from_a_probe_result() -> None:
    probed_model = mlp()
    result = autobatch.probe(
        probed_model,
        data(),
        optimizer=sgd(probed_model),
        memory_limit="52KiB",
        precision="fp32",
        device="cpu",
    )
    assert result.micro_batch < 32
    model = mlp()
    optimizer = sgd(model)
    step = make_step(model, optimizer)
    steps = optimizer_steps(optimizer)

    assert step.probe(result) is result
    assert step.result is result and step.micro_batch == result.micro_batch
    report = step(batches()[0])
    assert steps[0] == 1, "no probe on the first call"
    assert max(report.micro_batches) <= result.micro_batch and sum(report.micro_batches) == 32


def test_a_probe_result_of_another_precision_is_taken_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = mlp()
    result = autobatch.probe(
        model, data(), optimizer=sgd(model), memory_limit="52KiB", precision="bf16", device="cpu"
    )
    step = make_step(model, sgd(model))
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        step.probe(result)
    assert "measured in bf16, this step runs in fp32" in caplog.text
    assert step.micro_batch == result.micro_batch


def test_a_micro_batch_given_is_used_without_a_probe() -> None:
    model = mlp()
    optimizer = sgd(model)
    steps = optimizer_steps(optimizer)
    step = make_step(model, optimizer, micro_batch=5)
    report = step(batches()[0])
    assert step.result is None and steps[0] == 1
    assert report.micro_batches == (5, 5, 5, 5, 4, 4, 4)


def test_a_second_train_step_on_the_same_setup_takes_the_probe_from_the_cache(_cache_dir: Path) -> None:
    first_model = mlp()
    first = make_step(first_model, sgd(first_model))
    first(batches()[0])
    assert first.result is not None and not first.result.cached
    assert list(_cache_dir.glob("probe-*.json")), "the probe was stored"

    model = mlp()
    second = make_step(model, sgd(model))
    report = second(batches()[0])
    assert second.result is not None and second.result.cached
    assert second.result.micro_batch == first.result.micro_batch == PROBED
    assert report.micro_batches == (11, 11, 10)


def test_cache_false_neither_writes_nor_reads_the_cache(_cache_dir: Path) -> None:
    model = mlp()
    step = make_step(model, sgd(model), cache=False)
    step(batches()[0])
    assert step.result is not None and not step.result.cached
    assert not list(_cache_dir.glob("probe-*.json")), "nothing stored"

    first_model = mlp()
    make_step(first_model, sgd(first_model))(batches()[0])  # stored now
    model = mlp()
    again = make_step(model, sgd(model), cache=False)
    again(batches()[0])
    assert again.result is not None and not again.result.cached


def test_the_thread_count_is_logged_once_not_at_every_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch's own thread count (not the user's choice): autobatch runs on one thread, and says so once."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    from autobatch.memory.threads import chosen_by_user

    previous = torch.get_num_threads()
    torch.set_num_threads(max(os.cpu_count() or 1, 2))
    try:
        if chosen_by_user():
            pytest.skip("torch's default thread count cannot be told apart from a chosen one here")
        model = mlp()
        step = make_step(model, sgd(model), micro_batch=PROBED)
        with caplog.at_level(logging.INFO, logger="autobatch"):
            for batch in batches():
                step(batch)
        assert torch.get_num_threads() == max(os.cpu_count() or 1, 2), "the user's setting between calls"
    finally:
        torch.set_num_threads(previous)
    said = [r.getMessage() for r in caplog.records if "CPU thread(s)" in r.getMessage()]
    assert len(said) == 1, said


# -- the user's model mode, scheduler and checkpoints stay theirs -------------------------------------


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def test_a_model_in_eval_mode_stays_in_eval_mode() -> None:
    model = mlp()
    model.eval()
    step = make_step(model, sgd(model))  # probes on the first call
    for batch in batches()[:2]:
        step(batch)
        assert not any(modes(model).values())


def test_a_submodule_in_eval_mode_keeps_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 256), nn.Dropout(0.5), nn.Tanh(), nn.Linear(256, CLASSES))
    model.train()
    model[1].eval()  # the user froze dropout
    expected = modes(model)
    reference = copy.deepcopy(model)
    step = make_step(model, sgd(model))
    for batch in batches()[:2]:
        step(batch)
        assert modes(model) == expected
        reference_step(reference, sgd(reference), batch)  # no dropout ran: the steps are exact
    assert relative_error(model, reference) <= EXACT


def test_no_scheduler_is_stepped_unless_given() -> None:
    model = mlp()
    optimizer = sgd(model, lr=0.1)
    users = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # the user steps it, or not
    step = make_step(model, optimizer)
    for batch in batches()[:3]:
        step(batch)
    assert users.last_epoch == 0 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_scheduler_given_steps_once_per_applied_step() -> None:
    faults = Faults()
    model = mlp()
    optimizer = sgd(model, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    step = make_step(model, optimizer, scheduler=scheduler, step_fn=faults.step_fn)
    step(batches()[0])  # probes first: the probe's trials step no scheduler
    assert scheduler.last_epoch == 1
    faults.poison(1)
    assert not step(batches()[1]).applied
    step(batches()[2])
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def cpu_fp16() -> bool:
    """Whether this torch's CPU autocast runs fp16 (it does from torch 2.3 on): the GradScaler's test needs
    real fp16 steps, which scale the loss and grow the scale."""
    from torch.amp.autocast_mode import is_autocast_available

    if not is_autocast_available("cpu"):
        return False
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.Linear(2, 2)(torch.randn(1, 2)).dtype == torch.float16
    except RuntimeError:
        return False


@pytest.mark.skipif(not cpu_fp16(), reason="this torch's CPU autocast has no fp16")
def test_the_grad_scaler_round_trips_through_a_checkpoint() -> None:
    model = mlp()
    optimizer = sgd(model, lr=0.1)
    step = make_step(model, optimizer, micro_batch=PROBED, precision="fp16")
    assert step.scaler.is_enabled()
    # A scale that grows every 2 clean steps: after 3 steps it has grown once and counted one more.
    step.load_state_dict(
        {"scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2,
                    "_growth_tracker": 0}, "micro_batch": None}
    )  # fmt: skip
    data_batches = batches(160)
    for batch in data_batches[:3]:
        assert step(batch).applied
    state = step.state_dict()
    assert state["scaler"]["scale"] == 2048.0 and state["scaler"]["_growth_tracker"] == 1
    checkpoint = {"model": weights(model), "optimizer": copy.deepcopy(optimizer.state_dict()), "step": state}

    resumed_model = mlp(seed=9)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimizer = sgd(resumed_model, lr=0.1)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed = make_step(resumed_model, resumed_optimizer, precision="fp16")  # would probe; told instead
    resumed.load_state_dict(checkpoint["step"])
    assert resumed.scaler.get_scale() == 2048.0 and resumed.micro_batch == PROBED
    steps = optimizer_steps(resumed_optimizer)

    for batch in data_batches[3:]:
        ours, theirs = step(batch), resumed(batch)
        assert theirs.micro_batches == ours.micro_batches and theirs.loss == ours.loss
    assert steps[0] == len(data_batches[3:]), "no probe: the checkpoint told the micro-batch"
    assert resumed.state_dict()["scaler"] == step.state_dict()["scaler"]
    assert step.state_dict()["scaler"]["scale"] == 4096.0  # the growth after the checkpoint was kept
    assert relative_error(resumed_model, model) == 0.0


def test_the_micro_batch_after_a_back_off_round_trips_and_still_regrows() -> None:
    faults = Faults()
    model = mlp()
    step = make_step(model, sgd(model), step_fn=faults.step_fn, regrow_after=2)
    data_batches = batches(256)
    step(data_batches[0])
    faults.arm(2)
    (backoff,) = step(data_batches[1]).backoffs
    state = step.state_dict()
    assert state["micro_batch"] == backoff.to_micro < PROBED and state["max_micro_batch"] == PROBED

    resumed_model = mlp()
    resumed_optimizer = sgd(resumed_model)
    steps = optimizer_steps(resumed_optimizer)
    resumed = make_step(resumed_model, resumed_optimizer, step_fn=faults.step_fn, regrow_after=2)
    resumed.load_state_dict(state)
    assert resumed.micro_batch == backoff.to_micro
    report = resumed(data_batches[2])
    assert steps[0] == 1, "no probe: the checkpoint told the micro-batch"
    assert max(report.micro_batches) <= backoff.to_micro

    original = [step(batch).micro_batches for batch in data_batches[2:5]]
    resumed_sizes = [report.micro_batches] + [resumed(batch).micro_batches for batch in data_batches[3:5]]
    assert original[-1] == (11, 11, 10), "the original regrew to the probed micro-batch"
    assert resumed_sizes == original, "so does the resumed one: the checkpoint kept the largest"
    assert resumed.state_dict() == step.state_dict()


def test_load_state_dict_refuses_what_state_dict_did_not_return() -> None:
    model = mlp()
    step = make_step(model, sgd(model))
    with pytest.raises(UsageTypeError, match=r"`state` to be what TrainStep.state_dict\(\) returned"):
        step.load_state_dict({"scale": 1024.0})
    assert step.micro_batch is None


# -- bad input --------------------------------------------------------------------------------------


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    return (
        weights(model),
        modes(model),
        copy.deepcopy(optimizer.state_dict()),
        len(optimizer._optimizer_step_pre_hooks),
        len(optimizer._optimizer_step_post_hooks),
    )


def assert_unchanged(model: nn.Module, optimizer: torch.optim.Optimizer, before: Any) -> None:
    after = snapshot(model, optimizer)
    assert relative_error(model, before[0]) == 0.0
    assert after[1:] == before[1:]


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"optimizer": "adam"}, UsageTypeError, r"`optimizer` to be a torch.optim.Optimizer, but got str"),
        ({"optimizer": "another model's"}, UsageValueError, r"`optimizer` to hold the model's"),
        ({"micro_bach": 8}, UsageTypeError, r"`micro_bach`. Did you mean `micro_batch`\?"),
        ({"grad_clp": 1.0}, UsageTypeError, r"`grad_clp`. Did you mean `grad_clip`\?"),
        ({"epochs": 2}, UsageTypeError, r"unexpected keyword argument `epochs`"),
        ({"micro_batch": 0}, UsageValueError, r"`micro_batch`"),
        ({"micro_batch": 8, "max_batch": 16}, UsageValueError, r"no probe options with `micro_batch=8`"),
        ({"precision": "fp8"}, UsageValueError, r"`precision`"),
        ({"memory_limit": "lots"}, UsageValueError, r"`memory_limit`"),
    ],
    ids=["not-an-optimizer", "another-models-optimizer", "typo", "typo-2", "fit-only", "micro-batch-0",
         "probe-option-with-micro-batch", "precision", "memory-limit"],
)  # fmt: skip
def test_a_refused_construction_names_the_argument_and_changes_nothing(
    arguments: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = mlp()
    optimizer = sgd(model)
    model[1].eval()
    before = snapshot(model, optimizer)
    given = dict(arguments)
    if given.get("optimizer") == "another model's":
        given["optimizer"] = sgd(mlp(1))
    opt = given.pop("optimizer", optimizer)
    with pytest.raises(error, match=match):
        TrainStep(model, opt, device="cpu", **given)
    assert_unchanged(model, optimizer, before)
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        (
            (torch.empty(0, FEATURES), torch.empty(0, dtype=torch.long)),
            UsageValueError,
            r"`batch` to hold at least one sample, but got an empty batch",
        ),
        (3, UsageTypeError, r"`batch` to be a collated batch .* but got int"),
        (None, UsageTypeError, r"`batch` .* but got NoneType"),
        ((x for x in range(3)), UsageTypeError, r"`batch` .* but got generator"),
        ({"x": 1}, UsageTypeError, r"`batch` .* but got dict"),
    ],
    ids=["empty", "int", "none", "generator", "dict-of-int"],
)
def test_a_refused_batch_names_the_argument_and_changes_nothing(
    batch: Any, error: type[Exception], match: str
) -> None:
    model = mlp()
    optimizer = sgd(model)
    step = make_step(model, optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=match):
        step(batch)
    assert_unchanged(model, optimizer, before)
    assert step.steps == 0 and step.result is None and step.micro_batch is None
    assert step(batches()[0]).micro_batches == (11, 11, 10), "the step still works after the refusal"


def test_a_batch_whose_tensors_disagree_on_the_sample_count_is_refused() -> None:
    """32 inputs and 33 targets: plain PyTorch's loss refuses them; cut into micro-batches at the same
    bounds, one target would be dropped without a word and the others would still line up by chance."""
    model = mlp()
    optimizer = sgd(model)
    X, y = data(64)
    step = make_step(model, optimizer, micro_batch=PROBED)
    before = snapshot(model, optimizer)
    with pytest.raises(UsageValueError, match=r"`batch`.*32.*33"):
        step((X[:32], y[:33]))
    assert_unchanged(model, optimizer, before)


# -- the report reads as the loss -------------------------------------------------------------------


def test_the_report_reads_as_the_steps_loss() -> None:
    model, reference = mlp(), mlp()
    batch = batches()[0]
    report = make_step(model, sgd(model))(batch)
    expected = reference_step(reference, sgd(reference), batch)

    assert isinstance(report, StepReport)
    assert isinstance(float(report), float) and float(report) == report.loss
    assert float(report) == pytest.approx(expected, rel=1e-6)
    assert f"{report:.4f}" == f"{expected:.4f}" and f"{report:.2e}" == f"{expected:.2e}"
    assert report.item() == float(report) and isinstance(report.item(), float)


# -- on a real GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_trainstep_fp16_steps_exactly_its_batch_and_survives_a_real_oom() -> None:
    """On CUDA: probed on the first call under a capped allocator, fp16 with the GradScaler; a real
    out-of-memory in the third step (64 GiB asked, far past the cap) backs off and redoes the step."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    calls = {"n": 0, "armed": False}

    def step_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        if calls["armed"]:
            calls["armed"] = False
            torch.empty(64 * 2**30, dtype=torch.uint8, device="cuda")
        x, target = batch
        return F.cross_entropy(m(x), target)

    step = TrainStep(model, optimizer, step_fn=step_fn, memory_limit="256MiB", precision="fp16")
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(1024, 3, 64, 64, generator=g), torch.randint(0, 10, (1024,), generator=g)
    reports = []
    for i in range(0, 1024, 256):
        calls["armed"] = i == 512
        reports.append(step((X[i : i + 256].cuda(), y[i : i + 256].cuda())))
    assert step.precision == "fp16" and step.scaler.is_enabled()
    assert step.result is not None and step.result.device.startswith("cuda")
    assert all(sum(r.micro_batches) == 256 for r in reports), [r.micro_batches for r in reports]
    assert reports[2].backoffs and not reports[0].backoffs
    assert step.steps == 4 and all(math.isfinite(float(r)) for r in reports)
    assert torch.cuda.max_memory_reserved() > 0
