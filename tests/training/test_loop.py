"""Tests for autobatch.training.loop: exact gradient accumulation, OOM back-off and regrowth of one step."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autobatch.errors import NoBatchFitsError
from autobatch.options import Options
from autobatch.planner import plan
from autobatch.result import Backoff
from autobatch.session import Session, resolve
from autobatch.step import reading
from autobatch.step.stepper import Stepper
from autobatch.training.loop import TrainLoop, epoch_steps, warn_batchnorm

torch.set_num_threads(1)

CPU = torch.device("cpu")
CLASSES = 3
VOCAB, TOKEN_CLASSES, MAX_LEN = 20, 5, 12


class TokenTagger(nn.Module):
    """Embedding → tanh → linear: logits ``[B, T, C]`` for every token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.head = nn.Linear(8, TOKEN_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def classification_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def token_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token sequences of very different lengths; padding labels are -100."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, MAX_LEN, dtype=torch.long)
    labels = torch.full((n, MAX_LEN), -100, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, MAX_LEN + 1, (), generator=g))
        tokens[i, :length] = torch.randint(1, VOCAB, (length,), generator=g)
        labels[i, :length] = torch.randint(0, TOKEN_CLASSES, (length,), generator=g)
    return tokens, labels


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-padding tokens of a batch."""
    return F.cross_entropy(logits.reshape(-1, TOKEN_CLASSES), labels.reshape(-1), ignore_index=-100)


def count_tokens(batch: Any) -> torch.Tensor:
    return (batch[-1] != -100).sum()


def capturing_sgd(model: nn.Module, captured: list[list[torch.Tensor]]) -> torch.optim.Optimizer:
    """SGD with lr=0 that records the gradients it is asked to apply."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def record(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        captured.append(grads(model))

    optimizer.register_step_pre_hook(record)
    return optimizer


def grads(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        assert p.grad is not None
        out.append(p.grad.detach().clone())
    return out


def full_batch_grads(
    model: nn.Module, batch: tuple[torch.Tensor, ...], loss_fn: Callable[..., torch.Tensor]
) -> list[torch.Tensor]:
    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    loss_fn(reference(batch[0]), batch[1]).backward()
    return grads(reference)


def max_relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(float((a - b).norm() / b.norm()) for a, b in zip(got, expected, strict=True))


def session_for(model: nn.Module, data: Any, **options: Any) -> Session:
    """A started fit session on the CPU in fp32 (the model stays where it is)."""
    options = {"device": "cpu", "precision": "fp32", "progress": False, **options}
    session = resolve(model, data, Options.parse("fit", options))
    with session.start():
        pass
    return session


def make_loop(
    model: nn.Module,
    data: tuple[torch.Tensor, ...],
    captured: list[list[torch.Tensor]],
    *,
    micro: int,
    target: int = 32,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    num_items: Callable[[Any], Any] | None = None,
    regrow_after: int = 50,
    stepper: type[Stepper] = Stepper,
    **stepper_options: Any,
) -> TrainLoop:
    optimizer = capturing_sgd(model, captured)
    session = session_for(
        model,
        data,
        optimizer=optimizer,
        loss_fn=loss_fn,
        num_items=num_items,
        target_batch=target,
        micro_batch=micro,
        regrow_after=regrow_after,
    )
    step = stepper(model, optimizer, session.memory, "fp32", loss_fn=loss_fn, **stepper_options)
    return TrainLoop(session, step, micro)


def first_step(loop: TrainLoop, n: int = 32) -> float:
    """Run the loop's optimizer step on the first ``n`` samples of its data."""
    return loop.runner.optimizer_step(loop.session.source.fetch(list(range(n))), n)


# -- exact gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("micro", "chunks"),
    [(8, (8, 8, 8, 8)), (12, (11, 11, 10)), (32, (32,)), (5, (5, 5, 5, 5, 4, 4, 4))],
    ids=["even", "uneven", "single", "seven-uneven"],
)
def test_accumulated_gradient_equals_full_batch_gradient(micro: int, chunks: tuple[int, ...]) -> None:
    assert plan(micro, 32).chunks == chunks
    model = mlp()
    data = classification_data()
    host = (data[0][:32], data[1][:32])
    expected = full_batch_grads(model, host, F.cross_entropy)
    captured: list[list[torch.Tensor]] = []
    loop = make_loop(model, data, captured, micro=micro)

    loss = first_step(loop)

    assert len(captured) == 1 and loop.skipped_steps == 0
    assert max_relative_error(captured[0], expected) < 1e-6
    full_loss = F.cross_entropy(model(host[0]), host[1]).detach()
    assert loss == pytest.approx(float(full_loss), rel=1e-6)
    assert all(p.grad is None for p in model.parameters()), "gradients are zeroed after the step"


def test_naive_weighting_would_not_match_for_uneven_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """1/num_steps per micro-step is wrong for 11+11+10: the exactness test above can fail."""
    model = mlp()
    data = classification_data()
    host = (data[0][:32], data[1][:32])
    expected = full_batch_grads(model, host, F.cross_entropy)
    captured: list[list[torch.Tensor]] = []
    loop = make_loop(model, data, captured, micro=12)
    monkeypatch.setattr(loop.runner, "_weights", lambda parts, samples, counts: [1 / len(parts)] * len(parts))

    first_step(loop)

    assert max_relative_error(captured[0], expected) > 1e-4


@pytest.mark.parametrize("micro", [8, 12, 5])
def test_token_level_loss_is_exact_with_num_items(micro: int) -> None:
    torch.manual_seed(0)
    model = TokenTagger()
    data = token_data()
    host = (data[0][:32], data[1][:32])
    expected = full_batch_grads(model, host, token_loss)
    captured: list[list[torch.Tensor]] = []
    loop = make_loop(model, data, captured, micro=micro, loss_fn=token_loss, num_items=count_tokens)

    loss = first_step(loop)

    assert max_relative_error(captured[0], expected) < 1e-6
    assert loss == pytest.approx(float(token_loss(model(host[0]), host[1]).detach()), rel=1e-6)


def test_token_level_loss_weighted_by_samples_is_not_exact() -> None:
    """Without num_items, chunks with different token counts are mis-weighted."""
    torch.manual_seed(0)
    model = TokenTagger()
    data = token_data()
    host = (data[0][:32], data[1][:32])
    expected = full_batch_grads(model, host, token_loss)
    captured: list[list[torch.Tensor]] = []
    loop = make_loop(model, data, captured, micro=12, loss_fn=token_loss)

    first_step(loop)

    assert max_relative_error(captured[0], expected) > 1e-4


def test_num_items_counting_nothing_is_an_error() -> None:
    model = TokenTagger()
    tokens = torch.ones(4, 3, dtype=torch.long)
    labels = torch.full((4, 3), -100)
    loop = make_loop(
        model, (tokens, labels), [], micro=2, target=4, loss_fn=token_loss, num_items=count_tokens
    )
    with pytest.raises(ValueError, match="num_items"):
        first_step(loop, 4)


# -- out of memory inside a step --------------------------------------------------------------------


class FailingStepper(Stepper):
    """Raises torch.OutOfMemoryError on chosen micro-steps (1-based), after running forward and backward."""

    def __init__(self, *args: Any, fail_on: set[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_on = fail_on
        self.calls = 0

    def forward_backward(self, batch: Any, weight: float = 1.0) -> torch.Tensor:
        self.calls += 1
        loss = super().forward_backward(batch, weight)  # this micro-step's gradients are accumulated
        if self.calls in self.fail_on:
            raise torch.OutOfMemoryError(f"injected at call {self.calls}")
        return loss


def failing_loop(
    model: nn.Module, captured: list[list[torch.Tensor]], fail_on: set[int], micro: int, **kwargs: Any
) -> TrainLoop:
    return make_loop(
        model, classification_data(), captured, micro=micro, stepper=FailingStepper, fail_on=fail_on, **kwargs
    )


def test_oom_mid_step_redoes_the_step_without_partial_gradients() -> None:
    model = mlp()
    host = tuple(t[:32] for t in classification_data())
    expected = full_batch_grads(model, host, F.cross_entropy)
    captured: list[list[torch.Tensor]] = []
    # Call 2 is the second micro-step of the first attempt (11+11+10): its gradients and the first
    # micro-step's are already accumulated when the OOM is raised.
    loop = failing_loop(model, captured, {2}, micro=12)

    first_step(loop)

    assert len(captured) == 1, "the optimizer stepped once, after the redo"
    assert max_relative_error(captured[0], expected) < 1e-6
    assert loop.backoffs == [Backoff(epoch=0, step=0, from_micro=12, to_micro=6)]
    assert loop.micro == 6 and loop.plan.chunks == (6, 6, 5, 5, 5, 5)
    assert loop.steps == 1 and loop.samples == 32


def test_micro_batch_regrows_after_clean_steps() -> None:
    model = mlp()
    captured: list[list[torch.Tensor]] = []
    loop = failing_loop(model, captured, {1}, micro=12, regrow_after=2)

    first_step(loop)  # backs off 12 → 6; the redone step is the first clean one
    assert loop.micro == 6 and not loop.regrowths
    first_step(loop)
    assert loop.micro == 12
    assert loop.regrowths == [Backoff(epoch=0, step=2, from_micro=6, to_micro=12)]
    first_step(loop)
    assert loop.micro == 12 and len(loop.regrowths) == 1


def test_oom_at_a_batch_of_one_raises_no_batch_fits() -> None:
    model = mlp()
    loop = failing_loop(model, [], set(range(1, 100)), micro=4)
    with pytest.raises(NoBatchFitsError, match="micro-batch of 1 sample"):
        first_step(loop)
    assert [(b.from_micro, b.to_micro) for b in loop.backoffs] == [(4, 2), (2, 1)]
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_model_never_backs_off_below_two() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, CLASSES))
    loop = failing_loop(model, [], set(range(1, 100)), micro=8)
    # BatchNorm cannot train on one sample: a batch of 1 would raise its ValueError, not fit.
    with pytest.raises(NoBatchFitsError, match="micro-batch of 2 samples"):
        first_step(loop)
    assert [(b.from_micro, b.to_micro) for b in loop.backoffs] == [(8, 4), (4, 2)]


def test_non_oom_errors_propagate_unchanged() -> None:
    model = mlp()
    bad = (torch.randn(32, 7), torch.zeros(32, dtype=torch.long))  # wrong feature count
    loop = make_loop(model, bad, [], micro=8)
    with pytest.raises(RuntimeError, match="shapes"):
        first_step(loop)
    assert not loop.backoffs and loop.steps == 0


# -- epochs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("drop_last", "steps"), [(False, 3), (True, 2)])
def test_run_epoch_visits_every_index_once(drop_last: bool, steps: int) -> None:
    model = mlp()
    n = 70
    X, y = classification_data(n)
    ids = torch.arange(n)
    seen: list[int] = []

    def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, target, index = batch
        seen.extend(index.tolist())
        return F.cross_entropy(model(x), target)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = session_for(
        model, (X, y, ids), optimizer=optimizer, step_fn=step_fn, micro_batch=12, drop_last=drop_last, seed=1
    )
    loop = TrainLoop(session, Stepper(model, optimizer, session.memory, "fp32", step_fn=step_fn), 12)
    order = session.source.epoch_order(None, torch.Generator().manual_seed(1), 0)

    losses = loop.run_epoch(0, 1)

    assert len(losses) == steps and all(isinstance(v, float) for v in losses)
    expected = order[: 64 if drop_last else n]
    assert seen == expected
    assert loop.steps == steps and loop.samples == len(expected)


@pytest.mark.parametrize(
    ("n", "floor", "drop_last", "sizes"),
    [(65, 2, False, [32, 33]), (65, 1, False, [32, 32, 1]), (65, 2, True, [32, 32]), (1, 2, False, [1]),
     (64, 2, False, [32, 32]), (33, 2, False, [33])],
)  # fmt: skip
def test_a_lone_last_sample_of_a_batchnorm_model_joins_the_step_before(
    n: int, floor: int, drop_last: bool, sizes: list[int]
) -> None:
    steps = epoch_steps(list(range(n)), 32, drop_last=drop_last, floor=floor)
    assert [len(s) for s in steps] == sizes
    assert [i for s in steps for i in s] == list(range(sum(sizes)))


def test_batchnorm_epochs_never_train_on_one_sample() -> None:
    """k·target + 1 samples at micro 2: a last step of 1, and chunks of 1, would crash BatchNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, CLASSES))
    seen: list[int] = []

    def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        seen.append(len(batch[0]))
        return F.cross_entropy(model(batch[0]), batch[1])

    X, y = classification_data(2 * 8 + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = session_for(model, (X, y), optimizer=optimizer, step_fn=step_fn, target_batch=8, micro_batch=2)
    loop = TrainLoop(session, Stepper(model, optimizer, session.memory, "fp32", step_fn=step_fn), 2)
    losses = loop.run_epoch(0, 1)
    assert len(losses) == 2 and loop.samples == 17
    assert min(seen) >= 2 and sum(seen) == 17  # 2+2+2+2, then 3+2+2+2: the ninth sample joined a chunk


# -- BatchNorm warning ------------------------------------------------------------------------------


def test_warn_batchnorm_only_when_accumulating() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match="BatchNorm"):
        warn_batchnorm(model, plan(8, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_batchnorm(model, plan(32, 32))
        warn_batchnorm(mlp(), plan(8, 32))


def test_a_redone_step_updates_batchnorm_statistics_once() -> None:
    """Nothing twice: the micro-steps of the failed attempt had already updated the running statistics."""

    def bn_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, CLASSES))

    failed, clean = bn_model(), bn_model()
    captured: list[list[torch.Tensor]] = []
    loop = failing_loop(failed, captured, {2}, micro=12)  # the attempt 11+11+10 fails in its 2nd chunk
    first_step(loop)
    assert loop.micro == 6
    reference = make_loop(clean, classification_data(), [], micro=6)  # the redo's plan, from the start
    first_step(reference)
    for ours, theirs in zip(failed[1].buffers(), clean[1].buffers(), strict=True):
        assert torch.equal(ours, theirs)
    assert int(failed[1].num_batches_tracked) == len(plan(6, 32).chunks)


class WeightRecorder(Stepper):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weights: list[float] = []

    def forward_backward(self, batch: Any, weight: float = 1.0) -> torch.Tensor:
        self.weights.append(weight)
        return super().forward_backward(batch, weight)


def test_num_items_counts_the_micro_batches_as_collated() -> None:
    """A count of padded positions depends on how a step is cut: counted on the micro-batches that run,
    the weights still add up to one."""
    from tests.models import SequenceDataset, pad_collate

    dataset = SequenceDataset(32, min_len=2, max_len=20, seed=3)
    source = torch.utils.data.DataLoader(dataset, collate_fn=pad_collate)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 4), torch.nn.Flatten(0, 1))

    def padded_positions(batch: Any) -> int:
        return batch[0].numel()

    def loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return out.sum() * 0.0

    options = {"loss_fn": loss_fn, "num_items": padded_positions, "target_batch": 32, "micro_batch": 8}
    session = session_for(model, source, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stepper = WeightRecorder(model, optimizer, session.memory, "fp32", loss_fn=loss_fn)
    loop = TrainLoop(session, stepper, 8)
    first_step(loop)
    assert len(stepper.weights) == 4 and sum(stepper.weights) == pytest.approx(1.0, abs=1e-12)
    widths = [pad_collate([dataset[i] for i in range(a, a + 8)])[0].numel() for a in range(0, 32, 8)]
    assert stepper.weights == pytest.approx([w / sum(widths) for w in widths])


# -- host-side data loading: retried, never backed off ---------------------------------------------


class IndexedSamples(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """``(x, y, index)`` samples; reading sample ``bad`` raises ``error`` its first ``failures`` times.

    The reads are counted in a file, so that a DataLoader's worker processes count them too.
    """

    def __init__(self, n: int, bad: int, failures: int, error: Callable[[], Exception], log: Any) -> None:
        self.x, self.y = classification_data(n)
        self.bad, self.failures, self.error, self.log = bad, failures, error, log

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if i == self.bad:
            with open(self.log, "a+") as f:
                f.seek(0)
                tries = len(f.read())
                f.write("x")
            if tries < self.failures:
                raise self.error()
        return self.x[i], self.y[i], torch.tensor(i)


def recording_loop(data: Any, seen: list[int], **options: Any) -> TrainLoop:
    """A loop of micro-batch 12, target 32, that records the sample indices each micro-step trains on."""

    def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, target, index = batch
        seen.extend(index.tolist())
        return F.cross_entropy(model(x), target)

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = session_for(model, data, optimizer=optimizer, step_fn=step_fn, micro_batch=12, **options)
    return TrainLoop(session, Stepper(model, optimizer, session.memory, "fp32", step_fn=step_fn), 12)


@pytest.fixture
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reading, "RETRY_PAUSE_S", 0.0)


def out_of_memory() -> Exception:
    return torch.OutOfMemoryError("injected: the host is short of memory for a moment")


@pytest.mark.usefixtures("no_pause")
@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "in-a-worker"])
def test_a_read_that_runs_out_of_memory_once_is_retried_without_backing_off(
    workers: int, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = IndexedSamples(70, bad=40, failures=1, error=out_of_memory, log=tmp_path / "reads")
    data = torch.utils.data.DataLoader(dataset, num_workers=workers, shuffle=False)
    seen: list[int] = []
    loop = recording_loop(data, seen, shuffle=False)

    with caplog.at_level("WARNING", logger="autobatch"):
        losses = loop.run_epoch(0, 1)

    assert len(losses) == 3 and loop.steps == 3 and loop.samples == 70
    assert not loop.backoffs and loop.micro == 12, "host memory is not the micro-batch's fault"
    assert seen == list(range(70)), "every sample trained once: the failed read trained none"
    assert "trying again (1 of 3)" in caplog.text and "epoch 1, step 2" in caplog.text


@pytest.mark.usefixtures("no_pause")
def test_a_read_that_keeps_failing_raises_the_users_error_naming_the_step_and_samples(tmp_path: Any) -> None:
    dataset = IndexedSamples(70, bad=40, failures=100, error=out_of_memory, log=tmp_path / "reads")
    seen: list[int] = []
    loop = recording_loop(dataset, seen, shuffle=False)

    with pytest.raises(torch.OutOfMemoryError, match="injected") as caught:
        loop.run_epoch(0, 1)

    (note,) = caught.value.__notes__
    assert "epoch 1, step 2" in note and "failed 4 times" in note
    assert f"reading samples {list(range(32, 64))}" in note
    assert (tmp_path / "reads").read_text() == "x" * (1 + reading.READ_RETRIES)
    assert not loop.backoffs and loop.steps == 1 and seen == list(range(32))


class FlakyCollate:
    """The default collate, but collating a batch that holds sample ``bad`` raises its first ``failures``
    times."""

    def __init__(self, bad: int, failures: int) -> None:
        self.bad, self.failures, self.calls = bad, failures, 0

    def __call__(self, samples: list[Any]) -> Any:
        if any(int(s[2]) == self.bad for s in samples):
            self.calls += 1
            if self.calls <= self.failures:
                raise torch.OutOfMemoryError("injected in collate_fn")
        return torch.utils.data.default_collate(samples)


@pytest.mark.usefixtures("no_pause")
def test_a_collate_fn_that_runs_out_of_memory_once_is_retried_without_backing_off(tmp_path: Any) -> None:
    dataset = IndexedSamples(70, bad=-1, failures=0, error=out_of_memory, log=tmp_path / "reads")
    collate = FlakyCollate(bad=40, failures=1)
    seen: list[int] = []
    loop = recording_loop(torch.utils.data.DataLoader(dataset, collate_fn=collate), seen, shuffle=False)

    loop.run_epoch(0, 1)

    assert not loop.backoffs and loop.steps == 3 and seen == list(range(70))
    assert collate.calls == 2


@pytest.mark.usefixtures("no_pause")
def test_a_collate_fn_that_keeps_failing_raises_the_users_error_naming_the_micro_batch(tmp_path: Any) -> None:
    dataset = IndexedSamples(70, bad=-1, failures=0, error=out_of_memory, log=tmp_path / "reads")
    collate = FlakyCollate(bad=40, failures=100)
    loop = recording_loop(torch.utils.data.DataLoader(dataset, collate_fn=collate), [], shuffle=False)

    with pytest.raises(torch.OutOfMemoryError, match="injected in collate_fn") as caught:
        loop.run_epoch(0, 1)

    (note,) = caught.value.__notes__
    # Step 2 holds samples 32..63, cut 11+11+10: sample 40 is in its first micro-batch.
    assert (
        "epoch 1, step 2" in note and f"micro-batch 0:11 of the step's samples {list(range(32, 43))}" in note
    )
    assert collate.calls == 1 + reading.READ_RETRIES
    assert not loop.backoffs and loop.steps == 1


@pytest.mark.usefixtures("no_pause")
def test_any_error_in_a_read_is_retried_and_then_raised_as_it_is(tmp_path: Any) -> None:
    def corrupt() -> Exception:
        return KeyError("sample 40 is corrupt")

    dataset = IndexedSamples(70, bad=40, failures=100, error=corrupt, log=tmp_path / "reads")
    loop = recording_loop(dataset, [], shuffle=False)
    with pytest.raises(KeyError, match="corrupt") as caught:
        loop.run_epoch(0, 1)
    assert "epoch 1, step 2" in caught.value.__notes__[0]


# -- num_items --------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [float("nan"), float("inf"), -3.0])
def test_num_items_that_is_not_a_finite_count_is_refused_naming_the_step(count: float) -> None:
    model = TokenTagger()
    loop = make_loop(
        model, token_data(), [], micro=8, loss_fn=token_loss, num_items=lambda batch: torch.tensor(count)
    )
    with pytest.raises(
        ValueError, match=rf"`num_items` to return a finite count.* returned {count} .*step 1"
    ):
        first_step(loop)
    assert loop.steps == 0 and loop.nonfinite_steps == 0


def test_num_items_that_is_not_a_number_is_refused() -> None:
    loop = make_loop(TokenTagger(), token_data(), [], micro=8, loss_fn=token_loss, num_items=lambda b: b[-1])
    with pytest.raises(TypeError, match=r"`num_items` to return a number .* tensor of shape \(8, 12\)"):
        first_step(loop)


class CollateFailingOnCalls:
    """The default collate, raising on the chosen calls (1-based)."""

    def __init__(self, fail_on: set[int]) -> None:
        self.fail_on, self.calls = fail_on, 0

    def __call__(self, samples: list[Any]) -> Any:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"injected in collate_fn at call {self.calls}")
        return torch.utils.data.default_collate(samples)


@pytest.mark.usefixtures("no_pause")
def test_a_back_off_whose_failed_micro_batch_cannot_be_collated_again_still_redoes_the_step() -> None:
    """Collated again only to be measured: when that fails, the back-off goes unmeasured (it halves)."""
    model = mlp()
    X, y = classification_data()
    expected = full_batch_grads(model, (X[:32], y[:32]), F.cross_entropy)
    dataset = torch.utils.data.TensorDataset(X, y)
    # Calls 1-3 collate 11+11+10; micro-step 2 runs out of memory; calls 4-7 (the failed micro-batch,
    # collated again to measure it, and its retries) fail; the redo at 6 collates from call 8.
    collate = CollateFailingOnCalls({4, 5, 6, 7})
    captured: list[list[torch.Tensor]] = []
    optimizer = capturing_sgd(model, captured)
    data = torch.utils.data.DataLoader(dataset, collate_fn=collate)
    session = session_for(model, data, optimizer=optimizer, micro_batch=12)
    loop = TrainLoop(session, FailingStepper(model, optimizer, session.memory, "fp32", fail_on={2}), 12)

    first_step(loop)

    assert loop.backoffs == [Backoff(epoch=0, step=0, from_micro=12, to_micro=6)]
    assert collate.calls == 7 + 6 and len(captured) == 1
    assert max_relative_error(captured[0], expected) < 1e-6
