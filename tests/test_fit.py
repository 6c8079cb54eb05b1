"""End-to-end tests of autobatch.fit on the CPU: probe, accumulation, OOM back-off, evaluation, errors."""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import random
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from rich.console import Console
from sklearn.metrics import classification_report
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import autobatch
from autobatch import Backoff, FitResult, NoBatchFitsError, fit, plan, try_batch
from autobatch.step.stepper import Stepper

torch.set_num_threads(1)

FEATURES, CLASSES, TARGET = 16, 4, 32
NAMES = ["north", "east", "south", "west"]


# -- models and data --------------------------------------------------------------------------------


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def make_data(n: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable problem: the label is the argmax of a fixed linear map of the features."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, FEATURES, generator=g)
    W = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(1234))
    return X, (X @ W).argmax(1)


def with_ids(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    X, y = make_data(n, seed)
    return X, y, torch.arange(n)


@functools.cache
def limit_for(batch: int, precision: str = "fp32") -> int:
    """The emulated memory under which the MLP's full training step fits at ``batch``, and barely."""
    model = mlp()
    trial = try_batch(
        model,
        make_data(),
        batch,
        optimizer=sgd(model),
        precision=precision,
        memory_limit="64MiB",
        emulation="ideal",
    )
    assert trial.fitted and trial.peak_bytes is not None
    return trial.peak_bytes


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


def train(model: nn.Module, data: Any, **options: Any) -> FitResult:
    """``fit`` to the target batch of 32 with the tests' defaults: SGD, fp32 on the CPU, no progress bars."""
    if "optimizer" not in options:
        options["optimizer"] = sgd(model)
    return fit(model, data, TARGET, **{"precision": "fp32", "device": "cpu", "progress": False, **options})


class Recorder:
    """A ``step_fn`` on ``(x, y, ids)`` batches that records which samples each optimizer step used.

    Sample ids are held as pending until the optimizer steps. An out-of-memory failure (injected on
    chosen calls, or raised by the emulated device) forgets them when the loop reports it through
    ``Stepper.discard_step`` (patched by the ``recorder`` fixture), since the step is redone from its
    first sample.
    """

    def __init__(self, fail_calls: set[int] | frozenset[int] = frozenset()) -> None:
        self.fail_calls = set(fail_calls)
        self.calls = 0
        self.pending: list[int] = []
        self.steps: list[list[int]] = []

    def step_fn(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y, ids = batch
        self.calls += 1
        loss = F.cross_entropy(model(x), y)
        if self.calls in self.fail_calls:
            raise torch.OutOfMemoryError(f"injected at call {self.calls}")
        self.pending.extend(ids.tolist())
        return loss

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        optimizer.register_step_post_hook(lambda *args: self.commit())
        return optimizer

    def commit(self) -> None:
        self.steps.append(self.pending)
        self.pending = []

    def failed(self) -> None:
        self.pending = []

    def epochs(self, steps_per_epoch: int) -> list[list[int]]:
        return [
            [i for step in self.steps[e : e + steps_per_epoch] for i in step]
            for e in range(0, len(self.steps), steps_per_epoch)
        ]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    real_reset = Stepper.discard_step

    def discard_step(self: Stepper) -> None:
        rec.failed()
        real_reset(self)

    monkeypatch.setattr(Stepper, "discard_step", discard_step)
    return rec


def assert_each_sample_once_per_epoch(rec: Recorder, n: int, epochs: int) -> list[list[int]]:
    steps_per_epoch = math.ceil(n / TARGET)
    assert len(rec.steps) == epochs * steps_per_epoch
    assert all(
        len(step) == min(TARGET, n - (i % steps_per_epoch) * TARGET) for i, step in enumerate(rec.steps)
    )
    orders = rec.epochs(steps_per_epoch)
    assert len(orders) == epochs
    for order in orders:
        assert sorted(order) == list(range(n))
    return orders


# -- the plan and the bookkeeping -------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("drop_last", "samples", "steps"), [(False, 100, 4), (True, 96, 3)])
def test_fit_accumulates_to_the_target_batch(
    precision: str, drop_last: bool, samples: int, steps: int
) -> None:
    model = mlp()
    result = train(
        model,
        make_data(100),
        epochs=2,
        precision=precision,
        memory_limit=limit_for(10, precision),
        drop_last=drop_last,
        seed=0,
    )
    assert isinstance(result, FitResult)
    assert result.probe is not None and result.probe.precision == precision
    assert 1 < result.probe.micro_batch < TARGET
    assert result.plan.micro_batch == result.probe.micro_batch
    assert result.plan.accumulation_steps > 1
    assert result.plan.effective_batch == TARGET == sum(result.plan.chunks)
    assert result.epochs == 2
    assert result.samples == 2 * samples
    assert result.optimizer_steps == 2 * steps == len(result.losses)
    assert all(math.isfinite(v) for v in result.losses)
    # Uniform data under the probed limit: the training step is exactly what the probe measured.
    assert result.backoffs == [] and result.regrowths == []
    assert result.final_plan == result.plan
    assert result.skipped_steps == 0


def test_fit_learns() -> None:
    model = mlp()
    X, y = make_data(400)
    result = train(
        model,
        (X, y),
        epochs=8,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        micro_batch=8,
        seed=0,
    )
    assert result.losses[-1] < 0.5 * result.losses[0]
    model.eval()
    assert float((model(X).argmax(1) == y).float().mean()) > 0.8


def test_fit_is_reproducible_with_a_seed() -> None:
    runs = []
    for _ in range(2):
        model = mlp(seed=3)
        result = train(model, make_data(), epochs=2, micro_batch=12, seed=7)
        runs.append((model, result.losses))
    assert runs[0][1] == runs[1][1]
    assert_same_weights(runs[0][0], runs[1][0], atol=0)


def test_auto_precision_on_cpu_is_bf16_and_micro_batch_skips_the_probe() -> None:
    model = mlp()
    probed = fit(
        model, make_data(64), TARGET, optimizer=sgd(model), memory_limit="1MiB", device="cpu", progress=False
    )
    assert probed.probe is not None and probed.probe.precision == "bf16"
    model = mlp()
    given = fit(
        model, make_data(64), TARGET, optimizer=sgd(model), micro_batch=5, device="cpu", progress=False
    )
    assert given.probe is None
    assert given.plan.micro_batch == 5 and given.plan.chunks == (5, 5, 5, 5, 4, 4, 4)


def test_micro_batch_above_the_target_is_capped_at_the_target() -> None:
    model = mlp()
    result = train(model, make_data(64), micro_batch=100)
    assert result.plan.accumulation_steps == 1 and result.plan.chunks == (TARGET,)


# -- every sample exactly once per epoch ------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_once_per_epoch(recorder: Recorder, shuffle: bool) -> None:
    model = mlp()
    n = 90
    train(
        model,
        with_ids(n),
        epochs=3,
        step_fn=recorder.step_fn,
        optimizer=recorder.attach(sgd(model)),
        micro_batch=12,
        shuffle=shuffle,
        seed=1,
    )
    orders = assert_each_sample_once_per_epoch(recorder, n, 3)
    if shuffle:
        assert orders[0] != orders[1] != orders[2]
        assert orders[0] != list(range(n))
    else:
        assert orders == [list(range(n))] * 3


class DictSamples(Dataset[dict[str, torch.Tensor]]):
    """Samples as dicts; :func:`to_tuple` collates them into ``(x, y, ids)``."""

    def __init__(self, n: int) -> None:
        self.X, self.y, _ = with_ids(n)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.X[i], "y": self.y[i], "id": i}


def to_tuple(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.stack([s["x"] for s in samples]),
        torch.stack([s["y"] for s in samples]),
        torch.tensor([s["id"] for s in samples]),
    )


@pytest.mark.parametrize("loader_shuffle", [False, True])
def test_dataloader_keeps_its_collate_fn_and_sampler(recorder: Recorder, loader_shuffle: bool) -> None:
    n = 70
    loader = DataLoader(DictSamples(n), batch_size=5, shuffle=loader_shuffle, collate_fn=to_tuple)
    model = mlp()
    result = train(
        model,
        loader,
        epochs=2,
        step_fn=recorder.step_fn,
        optimizer=recorder.attach(sgd(model)),
        micro_batch=8,
        seed=0,
    )
    orders = assert_each_sample_once_per_epoch(recorder, n, 2)
    assert result.samples == 2 * n and result.optimizer_steps == 2 * 3
    if loader_shuffle:
        assert orders[0] != list(range(n)) and orders[0] != orders[1]
    else:
        assert orders == [list(range(n))] * 2  # the DataLoader's SequentialSampler, not fit's shuffle


def test_dataloader_with_a_worker(recorder: Recorder) -> None:
    n = 40
    loader = DataLoader(DictSamples(n), batch_size=5, collate_fn=to_tuple, num_workers=1)
    model = mlp()
    train(model, loader, step_fn=recorder.step_fn, optimizer=recorder.attach(sgd(model)), micro_batch=8)
    assert_each_sample_once_per_epoch(recorder, n, 1)


# -- out of memory mid-training ---------------------------------------------------------------------


def faulted_and_clean(rec: Recorder, **options: Any) -> tuple[nn.Module, FitResult, nn.Module, FitResult]:
    n = 96
    faulted = mlp()
    result = train(
        faulted,
        with_ids(n),
        step_fn=rec.step_fn,
        optimizer=rec.attach(sgd(faulted, 0.1)),
        shuffle=False,
        **options,
    )
    clean = mlp()
    reference = train(
        clean, with_ids(n), step_fn=Recorder().step_fn, optimizer=sgd(clean, 0.1), shuffle=False, **options
    )
    return faulted, result, clean, reference


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_oom_mid_training_loses_and_repeats_nothing(recorder: Recorder, seed: int) -> None:
    recorder.fail_calls = set(random.Random(seed).sample(range(1, 36), 3))

    faulted, result, clean, reference = faulted_and_clean(recorder, epochs=2, micro_batch=8)

    assert_each_sample_once_per_epoch(recorder, 96, 2)
    assert len(result.backoffs) == 3
    assert all(b.from_micro > b.to_micro >= 1 for b in result.backoffs)
    assert result.final_plan.micro_batch == 1
    assert (
        result.optimizer_steps == reference.optimizer_steps == 6
        and result.samples == reference.samples == 192
    )
    # No partial gradient was applied: the weights are those of a run that never ran out of memory.
    assert_same_weights(faulted, clean)
    torch.testing.assert_close(result.losses, reference.losses, rtol=1e-5, atol=1e-6)


class Flaky(nn.Module):
    """Runs out of memory on batches larger than ``limit`` during the chosen optimizer steps."""

    def __init__(self, fail_steps: set[int], limit: int = 3) -> None:
        super().__init__()
        self.net = mlp()
        self.fail_steps = fail_steps
        self.limit = limit
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step in self.fail_steps and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"batch {x.shape[0]} at step {self.step}")
        return self.net(x)


def test_oom_on_large_batches_backs_off_regrows_and_matches_a_clean_run() -> None:
    def run(fail_steps: set[int]) -> tuple[Flaky, FitResult]:
        model = Flaky(fail_steps)
        optimizer = sgd(model, 0.1)
        optimizer.register_step_post_hook(lambda *args: setattr(model, "step", model.step + 1))
        result = train(
            model, make_data(160), epochs=2, optimizer=optimizer, micro_batch=8, regrow_after=2, shuffle=False
        )
        return model, result

    faulted, result = run({1, 6})
    clean, _ = run(set())

    assert result.backoffs == [
        Backoff(0, 1, 8, 4),
        Backoff(0, 1, 4, 2),
        Backoff(1, 6, 8, 4),
        Backoff(1, 6, 4, 2),
    ]
    assert [(r.from_micro, r.to_micro) for r in result.regrowths] == [(2, 4), (4, 8), (2, 4), (4, 8)]
    assert result.final_plan == result.plan and result.final_plan.micro_batch == 8
    assert result.samples == 320 and result.optimizer_steps == 10
    assert_same_weights(faulted, clean)


def test_micro_batch_regrows_to_the_probed_size() -> None:
    shot = {"armed": True}

    def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y, ids = batch
        # The probe's batches hold the first samples only; sample 40 is in training step 1.
        if shot["armed"] and 40 in ids.tolist() and len(ids) > 1:
            shot["armed"] = False
            raise torch.OutOfMemoryError("injected once")
        return F.cross_entropy(model(x), y)

    model = mlp()
    X, y = make_data(160)
    result = train(
        model,
        (X, y, torch.arange(160)),
        step_fn=step_fn,
        memory_limit=limit_for(10),
        regrow_after=2,
        shuffle=False,
    )
    assert result.probe is not None
    probed = result.probe.micro_batch
    assert 1 < probed < TARGET
    # The failed micro-batch (the plan's largest chunk), measured again without the limit, fits (the
    # injected error was no lack of memory): the size the memory model allows after the failure is one
    # sample less than that chunk.
    chunk = max(plan(probed, TARGET).chunks)
    assert result.backoffs == [Backoff(0, 1, probed, chunk - 1)]
    # Recorded at the first step that runs with the grown micro-batch (the redone step 1 and step 2
    # were clean).
    assert result.regrowths == [Backoff(0, 3, chunk - 1, probed)]
    assert result.final_plan.micro_batch == probed


def test_oom_even_at_one_sample_raises_no_batch_fits() -> None:
    def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("never fits")

    model = mlp()
    with pytest.raises(NoBatchFitsError, match="batch of 1"):
        train(model, make_data(64), step_fn=step_fn, micro_batch=4)


def test_probe_with_nothing_fitting_raises_no_batch_fits() -> None:
    model = mlp()
    before = params(model)
    with pytest.raises(NoBatchFitsError, match="Not even a batch of 1"):
        train(model, make_data(64), memory_limit=2048)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


PAD = 0


class Sequences(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Token sequences, mostly short, a few long ones (which need far more memory once padded)."""

    def __init__(self, n: int, long_ids: set[int], short: int = 4, long: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.samples = [
            torch.randint(1, 32, (long if i in long_ids else short,), generator=g) for i in range(n)
        ]
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.samples[i], self.labels[i], i


def pad_collate(samples: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, ...]:
    tokens = nn.utils.rnn.pad_sequence([s for s, _, _ in samples], batch_first=True, padding_value=PAD)
    return tokens, torch.stack([label for _, label, _ in samples]), torch.tensor([i for _, _, i in samples])


class BagOfTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 16, padding_idx=PAD)
        self.hidden = nn.Linear(16, 64)
        self.head = nn.Linear(64, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(tokens))).mean(1))


def test_oom_on_the_emulated_device_for_long_sequences(recorder: Recorder) -> None:
    n, long_ids = 96, {5, 70}

    def peak(dataset: Dataset[Any], batch: int) -> int:
        model = BagOfTokens()
        loader = DataLoader(dataset, collate_fn=pad_collate)
        trial = try_batch(
            model,
            loader,
            batch,
            step_fn=Recorder().step_fn,  # the same step, not recorded
            optimizer=sgd(model),
            precision="fp32",
            memory_limit="64MiB",
            emulation="ideal",
        )
        assert trial.peak_bytes is not None
        return trial.peak_bytes

    limit = max(peak(Sequences(n, set()), 8), peak(Sequences(n, set(range(n))), 2))
    assert peak(Sequences(n, set(range(n))), 8) > limit  # eight long sequences do not fit

    model = BagOfTokens()
    loader = DataLoader(Sequences(n, long_ids), collate_fn=pad_collate)
    result = train(
        model,
        loader,
        epochs=1,
        step_fn=recorder.step_fn,
        optimizer=recorder.attach(sgd(model)),
        memory_limit=limit,
        micro_batch=8,
        regrow_after=1,
    )

    assert result.backoffs, "the long sequences ran out of memory on the emulated device"
    assert all(b.from_micro > b.to_micro for b in result.backoffs)
    assert {b.step for b in result.backoffs} == {0, 2}  # the steps holding samples 5 and 70
    assert result.samples == n and result.optimizer_steps == 3
    assert_each_sample_once_per_epoch(recorder, n, 1)


# -- scheduler, skipped steps, clipping -------------------------------------------------------------


def test_scheduler_instance_steps_once_per_optimizer_step() -> None:
    model = mlp()
    optimizer = sgd(model, 0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    result = train(
        model, make_data(100), epochs=2, optimizer=optimizer, scheduler=scheduler, memory_limit=limit_for(10)
    )
    assert result.optimizer_steps == 8
    assert scheduler.last_epoch == 8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**8)


def poisoned_step_fn(poisoned: set[int]) -> Any:
    """Cross-entropy, times inf for batches holding a poisoned sample: those steps get inf gradients."""

    def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y, ids = batch
        loss = F.cross_entropy(model(x), y)
        return loss * math.inf if poisoned & set(ids.tolist()) else loss

    return step_fn


@pytest.mark.parametrize("as_factory", [False, True])
def test_scheduler_is_not_stepped_on_skipped_steps(as_factory: bool) -> None:
    model = mlp()
    optimizer = sgd(model)
    made: list[torch.optim.lr_scheduler.LRScheduler] = []

    def factory(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        made.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)))
        return made[-1]

    scheduler: Any = factory if as_factory else factory(optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step")
        result = train(
            model,
            with_ids(96),
            epochs=2,
            step_fn=poisoned_step_fn({70}),
            optimizer=optimizer,
            scheduler=scheduler,
            precision="fp16",
            micro_batch=8,
            shuffle=False,
        )
    assert len(made) == 1 and made[0].optimizer is optimizer
    assert result.optimizer_steps == 6
    assert result.skipped_steps == 2  # step 2 of each epoch holds sample 70
    assert made[0].last_epoch == result.optimizer_steps - result.skipped_steps == 4
    assert math.isinf(result.losses[2]) and math.isinf(result.losses[5])


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_grad_clip_bounds_every_update(precision: str) -> None:
    model = mlp()
    before = params(model)
    clip = 1e-3
    train(
        model, make_data(32), optimizer=sgd(model, lr=1.0), grad_clip=clip, precision=precision, micro_batch=8
    )
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    # After unscale_: clipping the fp16-scaled gradients would leave an update 65536× too small.
    assert float(update.norm()) == pytest.approx(clip, rel=1e-2)

    unclipped = mlp()
    train(unclipped, make_data(32), optimizer=sgd(unclipped, lr=1.0), precision=precision, micro_batch=8)
    moved = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(unclipped.parameters(), before, strict=True)]
    )
    assert float(moved.norm()) > 100 * clip


# -- evaluation -------------------------------------------------------------------------------------


def own_report(model: nn.Module, X: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        predictions = model(X).argmax(-1)
    return classification_report(y.numpy(), predictions.numpy(), output_dict=True, zero_division=0, **kwargs)


def test_eval_report_matches_sklearn_on_our_own_predictions() -> None:
    model = mlp()
    X_test, y_test = make_data(75, seed=9)
    result = train(
        model,
        make_data(100),
        epochs=2,
        eval_data=(X_test, y_test),
        eval_batch=7,
        memory_limit=limit_for(10),
        seed=0,
    )
    assert [e.epoch for e in result.evals] == [0, 1]
    report = result.report
    assert report is not None and report is result.evals[-1]
    assert report.samples == 75 and report.batch_size == 7
    assert report.report == own_report(model, X_test, y_test)
    assert report.accuracy == pytest.approx(report.report["accuracy"])


def test_eval_report_with_target_names() -> None:
    model = mlp()
    X_test, y_test = make_data(80, seed=9)
    result = train(
        model, make_data(100), epochs=1, eval_data=(X_test, y_test), target_names=NAMES, micro_batch=8
    )
    report = result.report
    assert report is not None
    assert set(NAMES) <= set(report.report)
    assert all(name in report.text for name in NAMES)
    assert report.report == own_report(model, X_test, y_test, labels=[0, 1, 2, 3], target_names=NAMES)


def test_eval_backs_off_on_out_of_memory_and_still_scores_everything() -> None:
    def predict_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        if len(x) > 5:
            raise torch.OutOfMemoryError("evaluation batch too large")
        return model(x).argmax(-1), y

    model = mlp()
    X_test, y_test = make_data(61, seed=9)
    result = train(
        model,
        make_data(64),
        epochs=2,
        eval_data=(X_test, y_test),
        eval_batch=40,
        predict_fn=predict_fn,
        micro_batch=8,
    )
    first, last = result.evals
    assert first.backoffs == [(40, 20), (20, 10), (10, 5)]
    assert last.backoffs == []  # the next evaluation starts from the batch size that fitted
    assert last.batch_size == 5
    assert last.samples == 61
    assert last.report == own_report(model, X_test, y_test)


def test_eval_under_the_emulated_limit_backs_off() -> None:
    model = mlp()
    X_test, y_test = make_data(1000, seed=9)
    result = train(
        model, make_data(100), eval_data=(X_test, y_test), eval_batch=1000, memory_limit=limit_for(10)
    )
    report = result.report
    assert report is not None
    assert report.backoffs and report.batch_size < 1000
    assert report.samples == 1000
    assert report.report == own_report(model, X_test, y_test)


def test_evaluation_starts_from_a_batch_that_fits_without_warnings(caplog: pytest.LogCaptureFixture) -> None:
    # Inference holds no gradients or optimizer state: it fits more than the training micro-batch of 10,
    # and the memory model, from one measured batch, says how much more without running out of memory.
    caplog.set_level(logging.DEBUG, logger="autobatch")
    model = mlp()
    X_test, y_test = make_data(500, seed=9)
    result = train(model, make_data(100), epochs=2, eval_data=(X_test, y_test), memory_limit=limit_for(10))
    assert result.probe is not None and result.probe.max_fitting_batch == 10  # a plan of 8 × 4
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in loud if "evaluation" in m], loud
    first, last = result.evals
    assert first.backoffs == [] and last.backoffs == []
    assert 10 < first.batch_size < 500 and last.batch_size == first.batch_size
    assert last.samples == 500 and last.report == own_report(model, X_test, y_test)


def test_an_eval_batch_that_does_not_fit_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="autobatch")
    result = train(
        mlp(),
        make_data(100),
        epochs=2,
        eval_data=make_data(400, seed=9),
        eval_batch=400,
        memory_limit=limit_for(10),
    )
    first, last = result.evals
    assert first.backoffs and last.backoffs == []
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [
        f"eval_batch=400 does not fit: evaluation backed off to {first.batch_size}. Lower `eval_batch`, or "
        "leave it out to start from what the memory model says fits."
    ]
    retries = [r.getMessage() for r in caplog.records if "evaluation ran out of memory" in r.getMessage()]
    assert len(retries) == len(first.backoffs)  # each at debug level


class NonFiniteAtEval(nn.Module):
    """The MLP, whose outputs in eval mode are NaN where the first feature is above 0.5 and infinite below
    -1 (training, in train mode, is clean)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            return out
        out = out.masked_fill(x[:, :1] > 0.5, math.nan)
        return out.masked_fill(x[:, :1] < -1, math.inf)


def test_nan_and_infinite_outputs_are_counted_and_warned_about_once_per_evaluation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="autobatch")
    X_test, y_test = make_data(60, seed=9)
    expected = int(((X_test[:, 0] > 0.5) | (X_test[:, 0] < -1)).sum())
    assert 0 < expected < 60
    result = train(NonFiniteAtEval(), make_data(64), epochs=2, eval_data=(X_test, y_test), micro_batch=8)
    for report in result.evals:
        assert report.nonfinite == expected and report.samples == 60
        assert report.headline().endswith(f" · NaN/inf outputs in {expected} samples")
        assert f"NaN or infinite outputs in {expected} samples" in report.text
        assert report.to_dict()["nonfinite"] == expected
    warned = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(warned) == 2 and f"in {expected} samples" in warned[0]


def test_an_evaluation_that_fails_after_training_keeps_the_trained_result() -> None:
    def predict_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise KeyError("the user's scoring failed")

    model = mlp()
    before = params(model)
    with pytest.raises(
        autobatch.EvaluationError,
        match=r"^Training stopped after epoch 1 of 3 \(4 optimizer steps\), but the evaluation after epoch 1 "
        r"failed: KeyError: .the user's scoring failed.\. .*`except autobatch\.EvaluationError as error: "
        r"result = error\.result`",
    ) as caught:
        train(
            model,
            make_data(128),
            epochs=3,
            eval_data=make_data(40, seed=9),
            predict_fn=predict_fn,
            micro_batch=8,
        )
    error = caught.value
    assert isinstance(error, autobatch.AutobatchError) and error.epoch == 0
    assert isinstance(error.__cause__, KeyError)  # the original, never swallowed
    result = error.result
    assert isinstance(result, FitResult) and result.epochs == 1 and result.evals == []
    assert result.optimizer_steps == 4 and len(result.losses) == 4 and result.samples == 128
    assert result.plan.effective_batch == TARGET and result.seconds > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), "trained"


def test_labels_the_setup_check_cannot_tell_fail_after_training_with_the_result() -> None:
    # Integer multi-hot targets look like token labels until the model's outputs are seen.
    X_test = make_data(40, seed=9)[0]
    multi_hot = (torch.arange(40 * CLASSES).reshape(40, CLASSES) % 3 == 0).long()
    with pytest.raises(
        autobatch.EvaluationError, match=r"^Training finished \(1 epoch, 4 optimizer steps\)"
    ) as caught:
        train(mlp(), make_data(128), eval_data=(X_test, multi_hot), eval_batch=8, micro_batch=8)
    cause = caught.value.__cause__
    assert isinstance(cause, autobatch.UsageValueError)
    assert "logits (8, 4) and labels (8, 4) (multilabel targets?)" in str(cause)
    assert "predict_fn=" in str(cause)
    assert caught.value.result.epochs == 1 and len(caught.value.result.losses) == 4


# -- model kinds ------------------------------------------------------------------------------------


def test_batchnorm_warns_once_when_accumulating() -> None:
    def bn_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(FEATURES, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, CLASSES))

    model = bn_model()
    with pytest.warns(UserWarning, match="BatchNorm") as caught:
        train(model, make_data(100), epochs=2, micro_batch=8)
    assert sum("BatchNorm" in str(w.message) for w in caught) == 1
    assert caught[0].filename == __file__, "the warning points at the caller of fit"

    model = bn_model()
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        train(model, make_data(100), micro_batch=TARGET)
    assert not [w for w in quiet if "BatchNorm" in str(w.message)]


@dataclass
class HFOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class HFStyle(nn.Module):
    """``model(**batch)`` with ``labels`` returns ``.loss`` and ``.logits``, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> HFOutput:
        logits = self.net(features)
        return HFOutput(None if labels is None else F.cross_entropy(logits, labels), logits)


class DictData(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, seed: int = 0) -> None:
        self.X, self.y = make_data(n, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.X[i], "labels": self.y[i]}


def test_dict_batches_train_and_evaluate() -> None:
    model = HFStyle()
    eval_data = DictData(50, seed=9)
    result = train(
        model,
        DictData(100),
        epochs=2,
        optimizer=torch.optim.Adam(model.parameters(), 1e-2),
        eval_data=eval_data,
        memory_limit="1MiB",
        seed=0,
    )
    assert result.samples == 200 and result.optimizer_steps == 8
    assert result.losses[-1] < result.losses[0]
    assert result.report is not None
    assert result.report.report == own_report(model.net, eval_data.X, eval_data.y)


@pytest.mark.parametrize("limit", ["40KiB", "48KiB"])
def test_the_probed_micro_batch_trains_on_collated_dict_batches(limit: str) -> None:
    # default_collate stacks dict samples into new tensors. That is host work, as on a GPU: training
    # must count only the copy of the micro-batch under way, as the probe's trials do; counting the
    # whole step's collated micro-batches backed off to 1 sample and then raised NoBatchFitsError.
    model = HFStyle()
    result = fit(
        model, DictData(512), 64, memory_limit=limit, emulation="ideal", device="cpu", seed=0, progress=False
    )
    assert result.plan.accumulation_steps > 1  # the limit binds: the step is split
    assert result.backoffs == [] and result.samples == 512
    assert result.final_plan.micro_batch == result.probe.micro_batch


def test_step_fn_trains_unlabelled_data() -> None:
    torch.manual_seed(0)
    autoencoder = nn.Sequential(nn.Linear(FEATURES, 4), nn.Linear(4, FEATURES))
    X, _ = make_data(64)
    seen = []

    def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        (x,) = batch
        seen.append(len(x))
        return F.mse_loss(model(x), x)

    result = train(autoencoder, (X,), epochs=3, step_fn=step_fn, micro_batch=16)
    assert seen == [16] * 12
    assert result.losses[-1] < result.losses[0]
    assert result.optimizer_steps == 6


# -- bad input --------------------------------------------------------------------------------------


def unlabelled() -> tuple[torch.Tensor]:
    return (make_data(8)[0],)


BAD_INPUT: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("target_batch=0", {"target_batch": 0}, ValueError, "target_batch"),
    ("target_batch<0", {"target_batch": -32}, ValueError, "target_batch"),
    ("target_batch float", {"target_batch": 32.0}, TypeError, "target_batch"),
    ("target_batch bool", {"target_batch": True}, TypeError, "target_batch"),
    (
        "empty data",
        {"data": (torch.zeros(0, FEATURES), torch.zeros(0, dtype=torch.long))},
        ValueError,
        "`data`.*non-empty",
    ),
    (
        "empty eval_data",
        {"eval_data": (torch.zeros(0, FEATURES), torch.zeros(0, dtype=torch.long))},
        ValueError,
        "`eval_data`.*non-empty",
    ),
    ("data not data", {"data": 42}, TypeError, "`data`"),
    ("data unlabelled", {"data": unlabelled()}, ValueError, "`data`.*step_fn"),
    ("optimizer of another model", {"optimizer": "other"}, ValueError, "`optimizer`"),
    ("optimizer not an optimizer", {"optimizer": "adam"}, TypeError, "`optimizer`"),
    ("precision unknown", {"precision": "fp8"}, ValueError, "`precision`"),
    ("epochs=0", {"epochs": 0}, ValueError, "`epochs`"),
    ("epochs<0", {"epochs": -1}, ValueError, "`epochs`"),
    ("memory_limit unparsable", {"memory_limit": "lots"}, ValueError, "`memory_limit`"),
    ("memory_limit negative", {"memory_limit": "-1GiB"}, ValueError, "`memory_limit`"),
    ("memory_limit float", {"memory_limit": 1.5e9}, TypeError, "`memory_limit`"),
    ("target_names str", {"target_names": "abcd"}, TypeError, "`target_names`"),
    ("target_names ints", {"target_names": [0, 1, 2, 3]}, TypeError, "`target_names`"),
    ("eval_data unlabelled", {"eval_data": unlabelled()}, ValueError, "`eval_data`"),
    ("eval_data not data", {"eval_data": 3.14}, TypeError, "`eval_data`"),
    ("eval_batch=0", {"eval_batch": 0}, ValueError, "`eval_batch`"),
    ("micro_batch=0", {"micro_batch": 0}, ValueError, "`micro_batch`"),
    ("grad_clip<0", {"grad_clip": -1.0}, ValueError, "`grad_clip`"),
    ("regrow_after=0", {"regrow_after": 0}, ValueError, "`regrow_after`"),
    ("device unknown", {"device": "gpu0"}, ValueError, "`device`"),
    ("device int", {"device": 3.5}, TypeError, "`device`"),
    ("device meta", {"device": "meta"}, ValueError, "`device`.*meta"),
]


@pytest.mark.parametrize(
    ("options", "error", "match"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_is_refused_and_the_model_is_untouched(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = mlp()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moves: list[Any] = []
    real_apply = model._apply
    model._apply = lambda fn, *args, **kwargs: moves.append(fn) or real_apply(fn, *args, **kwargs)  # type: ignore[method-assign]
    arguments: dict[str, Any] = {
        "model": model,
        "data": make_data(64),
        "target_batch": TARGET,
        "precision": "fp32",
        "micro_batch": 8,
        "progress": False,
        "device": "cpu",
        **options,
    }
    if arguments.get("optimizer") == "other":
        arguments["optimizer"] = sgd(mlp())
    rng = torch.get_rng_state()
    with pytest.raises(error, match=match):
        fit(**arguments)
    assert not moves, "the model was moved before the arguments were checked"
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    assert all(p.device.type == "cpu" and p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_model_without_trainable_parameters_is_refused() -> None:
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"`model`.*trainable"):
        fit(model, make_data(64), TARGET, device="meta", progress=False)
    with pytest.raises(ValueError, match=r"`model`.*trainable"):
        fit(nn.ReLU(), make_data(64), TARGET, device="cpu", progress=False)
    with pytest.raises(TypeError, match="`model`"):
        fit("resnet50", make_data(64), TARGET, device="cpu", progress=False)  # type: ignore[arg-type]


def test_too_few_target_names_name_the_argument() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="target_names"):
        train(model, make_data(64), eval_data=make_data(32, seed=9), target_names=NAMES[:2], micro_batch=8)


# -- the result -------------------------------------------------------------------------------------


def test_fit_result_serialises_and_renders() -> None:
    model = mlp()
    result = train(
        model,
        make_data(100),
        epochs=2,
        eval_data=make_data(40, seed=9),
        target_names=NAMES,
        memory_limit=limit_for(10),
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["plan"]["effective_batch"] == TARGET
    assert data["probe"]["micro_batch"] == result.plan.micro_batch
    assert data["optimizer_steps"] == 8 and data["samples"] == 200 and len(data["losses"]) == 8
    assert len(data["evals"]) == 2 and "north" in data["evals"][-1]["report"]
    assert result.samples_per_second > 0 and result.seconds >= result.train_seconds > 0

    out = io.StringIO()
    console = Console(file=out, width=120, color_system=None)
    console.print(result)
    console.print(result.probe)
    text = out.getvalue()
    assert "autobatch fit" in text and result.plan.describe() in text
    assert "accuracy" in text and "autobatch probe" in text


def test_public_api_exports_fit() -> None:
    assert autobatch.fit is fit and "fit" in autobatch.__all__


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_is_refused_before_touching_the_model() -> None:
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"`device` is 'cuda' but CUDA is not available"):
        autobatch.fit(model, make_data(), device="cuda", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_fp16_accumulates_and_survives_a_real_oom() -> None:
    """On real CUDA: fp16 + GradScaler, the allocator capped, one real OOM injected mid-training."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(1024, 3, 64, 64, generator=g), torch.randint(0, 10, (1024,), generator=g)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    state = {"items_calls": 0, "armed": False}

    def num_items(batch: Any) -> int:
        # Only the training loop calls num_items (the probe does not): arm one OOM in training.
        state["items_calls"] += 1
        if state["items_calls"] == 5:
            state["armed"] = True
        return len(batch[1])

    def step_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        if state["armed"]:
            state["armed"] = False
            torch.empty(64 * 2**30, dtype=torch.uint8, device="cuda")  # far past the cap: a real OOM
        x, target = batch
        return nn.functional.cross_entropy(m(x), target)

    result = autobatch.fit(
        model,
        (X, y),
        target_batch=512,
        epochs=2,
        step_fn=step_fn,
        num_items=num_items,
        memory_limit="512MiB",
        device="cuda",
        seed=0,
        progress=False,
    )
    assert result.probe is not None and result.probe.precision == "fp16"
    assert result.probe.capped_by is None, result.probe.summary()  # the cap binds
    assert result.plan.accumulation_steps > 1 and result.plan.effective_batch == 512
    assert result.samples == 2 * 1024
    assert result.backoffs, "the injected OOM must have been survived by backing off"
    assert all(math.isfinite(loss) for loss in result.losses)
    assert torch.cuda.get_per_process_memory_fraction() == 1.0  # the cap is lifted afterwards


# -- an emulated device with CUDA's caching allocator ----------------------------------------------------


def test_the_probed_micro_batch_trains_20_steps_through_the_allocator_without_an_oom() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20 * 160, 2048, generator=g), torch.randint(0, 10, (20 * 160,), generator=g)
    result = fit(
        model, (X, y), 160, optimizer=sgd(model), precision="fp32", device="cpu", progress=False,
        memory_limit="24MiB", emulation="allocator", shuffle=False,
    )  # fmt: skip
    assert result.probe is not None and result.probe.limit_kind.endswith("CUDA's caching allocator)")
    assert result.plan.accumulation_steps > 1  # micro-batches of the probed size, accumulated
    assert result.optimizer_steps == 20 and result.backoffs == [] and result.skipped_steps == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# 288 MiB of fp32 weights: with AdamW's two moments and the gradients, 1.13 GiB of model state.
@pytest.mark.parametrize(("memory_limit", "precision"), [("2GiB", "fp32"), ("2GiB", "bf16"), (None, "fp16")])
def test_cuda_evaluation_starts_from_a_batch_that_fits(
    memory_limit: str | None, precision: str, caplog: pytest.LogCaptureFixture
) -> None:
    """On real CUDA the memory model's line uses allocated bytes (the training's cached blocks are free for
    inference): the evaluation batch is larger than the micro-batch and runs without a warning."""
    caplog.set_level(logging.DEBUG, logger="autobatch")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8192, 1024, generator=g), torch.randint(0, 10, (8192,), generator=g)
    X_test, y_test = torch.randn(30000, 1024, generator=g), torch.randint(0, 10, (30000,), generator=g)
    model = nn.Sequential(
        nn.Linear(1024, 8192), nn.ReLU(), nn.Linear(8192, 8192), nn.ReLU(), nn.Linear(8192, 10)
    )
    result = autobatch.fit(
        model,
        (X, y),
        target_batch=4096,
        epochs=2,
        eval_data=(X_test, y_test),
        memory_limit=memory_limit,
        precision=precision,
        device="cuda",
        progress=False,
        cache=False,
    )
    assert result.probe is not None
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in loud if "evaluation" in m], loud
    first, last = result.evals
    assert first.batch_size > result.probe.micro_batch or first.batch_size == 30000
    assert last.backoffs == [] and last.samples == 30000
