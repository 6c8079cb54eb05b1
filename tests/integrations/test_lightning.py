"""Tests for autobatch.integrations.lightning: the AutoBatch callback, counted and compared from outside.

A module written for a batch of 8 accumulated 4 times, under a limit where a batch of 32 does not fit
whole, must train with every optimizer step seeing 32 samples and end with the weights of a plain batch of
32 (SGD, the same samples in the same order). Runs under DDP are in ``test_distributed.py`` of this folder.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

import autobatch  # noqa: E402
from autobatch.integrations.lightning import AutoBatch, largest_divisor  # noqa: E402
from tests.hf_fixtures import classification_samples, padding_collator  # noqa: E402
from tests.integrations.hf_helpers import LIMIT, flat, rel_err  # noqa: E402
from tests.integrations.pl_helpers import BertModule, StepSamples, trainer  # noqa: E402

N = 96


@dataclasses.dataclass
class Run:
    module: Any
    trainer: Any
    counted: StepSamples


def fit(
    samples: list[Any], batch_size: int, accumulate: int = 1, callbacks: tuple[Any, ...] = (), **kw: Any
) -> Run:
    pl.seed_everything(0, verbose=False)
    module, counted = BertModule(samples, batch_size, **kw), StepSamples()
    run = trainer([counted, *callbacks], accumulate)
    run.fit(module)
    return Run(module, run, counted)


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    samples = classification_samples(N)
    callback = AutoBatch(memory_limit=LIMIT)
    return {
        "plain": fit(samples, 32),
        "autobatch": fit(samples, 8, 4, (callback,)),  # written for 8 × 4: the target is 32
        "callback": callback,
    }


def test_every_optimizer_step_sees_exactly_the_target_where_it_does_not_fit_whole(
    runs: dict[str, Any],
) -> None:
    callback, ours = runs["callback"], runs["autobatch"]
    probe = callback.probe_result
    assert callback.target_batch == 32 and probe.first_failure is not None and probe.first_failure <= 32
    assert callback.micro_batch == largest_divisor(32, probe.micro_batch) and 32 % callback.micro_batch == 0
    assert ours.module.batch_size == callback.micro_batch
    assert ours.trainer.accumulate_grad_batches == callback.accumulate == 32 // callback.micro_batch
    assert ours.counted.steps == [32] * 6  # counted in the batches Lightning's loop hands the module


def test_the_weights_equal_one_batch_of_the_target(runs: dict[str, Any]) -> None:
    plain, ours = runs["plain"], runs["autobatch"]
    assert rel_err(flat(ours.module.model), flat(plain.module.model)) < 1e-6
    assert ours.trainer.global_step == plain.trainer.global_step == 6


def test_an_oom_mid_training_stops_with_a_note_saying_what_to_resume_with() -> None:
    callback = AutoBatch(target_batch=32, micro_batch=8)
    with pytest.raises(torch.OutOfMemoryError, match="injected") as excinfo:
        fit(classification_samples(N), 32, 1, (callback,), oom_at=1)
    (note,) = excinfo.value.__notes__
    assert "ran out of memory at micro-batch 8 × 4 accumulated (step 2)" in note
    assert "Lightning cannot redo a step" in note
    assert "AutoBatch(target_batch=32, micro_batch=4) (accumulate_grad_batches=8)" in note


def test_a_given_micro_batch_becomes_the_largest_divisor_and_a_short_last_step_is_warned_about() -> None:
    callback = AutoBatch(target_batch=32, micro_batch=6)
    with pytest.warns(UserWarning, match=r"not a multiple of the 8 .*Trainer\(limit_train_batches=16\)"):
        run = fit(classification_samples(80), 32, 1, (callback,))
    assert (callback.micro_batch, callback.accumulate, run.module.batch_size) == (4, 8, 4)
    assert run.counted.steps == [32, 32, 16] * 2  # 80 = 32 + 32 + 16: the last step is short
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pl.seed_everything(0, verbose=False)
        module, counted = BertModule(classification_samples(80), 32), StepSamples()
        callback = AutoBatch(target_batch=32, micro_batch=6)
        trainer([counted, callback], limit_train_batches=16).fit(module)
    assert counted.steps == [32, 32] * 2


class Manual(BertModule):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False


class Unbatched(BertModule):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self.batch_size


@pytest.mark.parametrize(
    ("module", "loaders", "match"),
    [
        (Manual, False, "needs automatic optimization"),
        (Unbatched, False, "sets `batch_size` for the train loader, but neither"),
        (BertModule, True, "dataloaders passed to trainer.fit"),
    ],
)
def test_what_it_cannot_do_is_refused_before_training(module: type, loaders: bool, match: str) -> None:
    model = module(classification_samples(8), 8)
    before = flat(model.model)
    loader = torch.utils.data.DataLoader(model.samples, batch_size=8, collate_fn=padding_collator())
    with pytest.raises(autobatch.UsageValueError, match=match):
        trainer([AutoBatch(target_batch=32)]).fit(model, train_dataloaders=loader if loaders else None)
    assert torch.equal(flat(model.model), before)


def test_callbacks_that_change_the_batch_or_the_accumulation_too_are_refused() -> None:
    rival = pl.callbacks.GradientAccumulationScheduler({0: 2})
    with pytest.raises(autobatch.UsageValueError, match="GradientAccumulationScheduler changes too"):
        trainer([AutoBatch(target_batch=32), rival]).fit(BertModule(classification_samples(8), 8))


def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(autobatch.UsageValueError, match="`target_batch` to be a positive int"):
        AutoBatch(target_batch=0)
    with pytest.raises(autobatch.UsageTypeError, match="Did you mean `memory_limit`"):
        AutoBatch(memory_limt="8MiB")
    with pytest.raises(autobatch.UsageValueError, match="no probe options with `micro_batch=8`"):
        AutoBatch(micro_batch=8, margin=0.1)
