"""Text as users bring it, on the project's own padded-sequence models (no extra needed).

Dict batches padded per micro-batch, a probe whose worst case covers padding, a measured back-off,
language-model evaluation with the shift, and the figures of ``NoBatchFitsError``.
(``tests/test_hf.py`` checks the same on BERT and GPT-2 where transformers is installed.)

At ``CAP`` in bf16 a batch of the longest samples alone fits far more (``LONGEST``) than one that also holds
a short sample (``MIXED``): the short one is padded, and the model then builds a ``(batch, length,
length)`` attention bias, as BERT does.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import autobatch
from autobatch.errors import NoBatchFitsError
from autobatch.memory.device import DeviceMemory
from autobatch.options import Options
from autobatch.result import Backoff
from autobatch.session import resolve
from autobatch.step.stepper import Stepper
from autobatch.training.loop import TrainLoop
from autobatch.training.metrics import eval_kind
from tests.text_models import MAX_LEN, PaddedEncoder, TinyCausalLM, collate, lm_collate, text_samples

CAP = "7.8MiB"
MEMORY: dict[str, Any] = {"memory_limit": CAP, "emulation": "ideal", "precision": "bf16", "device": "cpu"}
QUIET: dict[str, Any] = {"seed": 0, "progress": False}


def loader(samples: list[dict[str, Any]], fn: Any = collate) -> DataLoader[Any]:
    return DataLoader(samples, collate_fn=fn)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sizes() -> tuple[int, int]:
    """(LONGEST, MIXED): the largest batch of the longest samples alone, and the largest that fits with
    padding too, both checked exhaustively with try_batch."""
    samples = text_samples()
    longest = [s for s in samples if len(s["input_ids"]) == MAX_LEN]  # all one length: never padded
    fits_longest = [
        b
        for b in range(1, len(longest) + 1)
        if autobatch.try_batch(PaddedEncoder(), loader(longest), b, **MEMORY).fitted
    ]
    largest_longest = max(fits_longest)
    mixed = next(
        b
        for b in range(largest_longest, 0, -1)
        if autobatch.try_batch(PaddedEncoder(), loader(samples), b, **MEMORY).fitted
    )
    assert largest_longest < len(longest)  # the cap, not the number of long samples, decides
    return largest_longest, mixed


def test_the_cap_separates_the_longest_batch_from_a_padded_one(sizes: tuple[int, int]) -> None:
    longest, mixed = sizes
    assert mixed + 2 <= longest and longest // 2 != mixed  # a real gap, and halving cannot land on it


def test_each_micro_batch_is_padded_to_its_own_longest_sample() -> None:
    samples = text_samples()
    calls: list[tuple[list[int], tuple[int, ...]]] = []

    def recording(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        collated = collate(batch)
        calls.append(([len(s["input_ids"]) for s in batch], tuple(collated["input_ids"].shape)))
        return collated

    result = autobatch.fit(
        PaddedEncoder(), loader(samples, recording), target_batch=32, micro_batch=8, **MEMORY, **QUIET
    )
    assert result.plan.chunks == (8, 8, 8, 8) and result.backoffs == []
    assert [len(lengths) for lengths, _ in calls] == [8] * (len(samples) // 8)  # one collation per micro
    for lengths, shape in calls:
        assert shape == (8, max(lengths))
    # Padded to its step's longest sample instead, every micro-batch of a step would be as wide.
    steps = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    narrower = [shape[1] < max(max(lengths) for lengths, _ in step) for step in steps for _, shape in step]
    assert sum(narrower) >= len(calls) // 4


def test_the_probe_measures_a_padded_batch_and_training_never_backs_off(sizes: tuple[int, int]) -> None:
    longest, mixed = sizes
    samples = text_samples()
    # Three micro-batches of the probed size a step, 3 steps an epoch (the last one shorter).
    result = autobatch.fit(
        PaddedEncoder(), loader(samples), target_batch=3 * mixed, epochs=7, **MEMORY, **QUIET
    )
    assert result.probe is not None and result.probe.micro_batch == mixed
    assert result.plan.chunks == (mixed, mixed, mixed)  # fit's probe replays this plan, padded batches too
    assert any(t.case == "mixed" for t in result.probe.trials)
    assert result.optimizer_steps >= 20 and result.backoffs == []
    # The longest batch alone, as the probe measured before, runs out of memory in training.
    before = autobatch.fit(
        PaddedEncoder(), loader(samples), target_batch=longest, micro_batch=longest, **MEMORY, **QUIET
    )
    assert before.backoffs


def test_where_padding_costs_nothing_more_the_probe_takes_one_step_more() -> None:
    # In fp32 at 3 MiB the attention bias of a padded batch is no larger than what the longest batch's
    # training already holds elsewhere: the confirmation on the mixed case survives.
    options = {**MEMORY, "memory_limit": "3MiB", "precision": "fp32"}
    result = autobatch.probe(PaddedEncoder(), loader(text_samples()), cache=False, **options)
    mixed = [t for t in result.trials if t.case == "mixed"]
    assert [(t.batch, t.fitted) for t in mixed] == [(result.max_fitting_batch, True)]
    assert result.optimizer_steps <= 6  # two traced, two verdicts, the confirmation


def test_the_back_off_goes_where_the_measured_failure_says(sizes: tuple[int, int]) -> None:
    longest, mixed = sizes
    samples = text_samples()
    options = Options.parse("fit", {"target_batch": longest, "micro_batch": longest, **MEMORY, **QUIET})
    probe = autobatch.probe(PaddedEncoder(), loader(samples), cache=False, **MEMORY)
    model = PaddedEncoder()
    session = resolve(model, loader(samples), options)
    with session.start():
        assert session.optimizer is not None
        stepper = Stepper(model, session.optimizer, session.memory, session.precision)
        # What fit does: the probe's memory model (its fixed part) goes to the loop.
        loop = TrainLoop(session, stepper, longest, probe.fixed_bytes)
        order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
        step = [*order[: longest - 1], order[-1]]  # the longest but one and the shortest: padded
        with session.memory.capped():
            loop.runner.optimizer_step(session.source.fetch(step), longest)
    assert loop.backoffs == [Backoff(0, 0, longest, mixed)]  # one measured step down, to the answer


def test_training_backs_off_by_measure_not_by_halving(sizes: tuple[int, int]) -> None:
    longest, mixed = sizes
    result = autobatch.fit(
        PaddedEncoder(), loader(text_samples()), target_batch=longest, micro_batch=longest, **MEMORY, **QUIET
    )
    sizes_after = [b.to_micro for b in result.backoffs]
    assert sizes_after and sizes_after[0] != longest // 2
    # Without a probe the memory model's fixed part is the model state (no workspace): one more measured
    # back-off may follow; it settles on the largest size that fits.
    assert len(sizes_after) <= 2 and mixed <= sizes_after[0] <= mixed + 1 and min(sizes_after) == mixed


def test_where_nothing_is_roomier_the_error_bounds_the_back_off(
    sizes: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA at its full capacity: no re-measure; what the error says it needed still steers the back-off."""
    longest, mixed = sizes
    monkeypatch.setattr(DeviceMemory, "roomy", lambda self, **_: None)
    samples = text_samples()
    result = autobatch.fit(
        PaddedEncoder(), loader(samples), target_batch=longest, micro_batch=longest, **MEMORY, **QUIET
    )
    sizes_after = [b.to_micro for b in result.backoffs]
    assert sizes_after == sorted(sizes_after, reverse=True)
    assert sizes_after[0] > longest // 2  # a lower bound of the need: a smaller step down than halving
    assert max(result.final_plan.chunks) <= mixed and result.samples == len(samples)


# -- language models --------------------------------------------------------------------------------


def _by_hand(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token loss, shifted and unshifted token accuracy over ``batches``, computed here in fp32."""
    loss = correct = plain = tokens = plain_tokens = 0.0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[
                "logits"
            ].float()
            labels = batch["labels"]
            shifted, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            keep = targets != -100
            loss += float(torch.nn.functional.cross_entropy(shifted[keep], targets[keep], reduction="sum"))
            correct += float((shifted[keep].argmax(-1) == targets[keep]).sum())
            tokens += float(keep.sum())
            flat, all_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            kept = all_labels != -100
            plain += float((flat[kept].argmax(-1) == all_labels[kept]).sum())
            plain_tokens += float(kept.sum())
    model.train()
    return {
        "loss": loss / tokens,
        "accuracy": correct / tokens,
        "unshifted": plain / plain_tokens,
        "tokens": tokens,
    }


def test_causal_lm_evaluation_reports_shifted_accuracy_loss_and_perplexity() -> None:
    samples = text_samples(96)
    model = TinyCausalLM()
    options = {"device": "cpu", "precision": "fp32", "memory_limit": "64MiB", "emulation": "ideal"}
    result = autobatch.fit(
        model,
        loader(samples, lm_collate),
        target_batch=32,
        eval_data=loader(samples[:40], lm_collate),
        eval_task="causal_lm",
        **options,
        **QUIET,
    )
    report = result.report
    assert report is not None and report.kind == "causal_lm"
    expected = _by_hand(model, [lm_collate(samples[i : i + 8]) for i in range(0, 40, 8)])
    assert report.tokens == expected["tokens"] == sum(len(s["input_ids"]) - 1 for s in samples[:40])
    assert report.loss == pytest.approx(expected["loss"], rel=1e-5)
    assert report.perplexity == pytest.approx(math.exp(report.loss))
    assert report.accuracy == pytest.approx(expected["accuracy"])
    assert report.samples == 40 and len(report.text.splitlines()) < 8
    assert "perplexity" in report.headline()


def test_without_the_shift_a_tied_model_would_score_its_own_input() -> None:
    """Why the shift matters: an untrained model with tied embeddings "predicts" its current token."""
    model = TinyCausalLM()
    figures = _by_hand(model, [lm_collate(text_samples(32))])
    assert figures["unshifted"] > 0.5 > 0.2 > figures["accuracy"]


def test_auto_tells_language_models_by_their_class() -> None:
    class TinyForCausalLM(TinyCausalLM):
        pass

    class TinyForMaskedLM(PaddedEncoder):
        pass

    assert eval_kind(TinyForCausalLM(), "auto", None) == "causal_lm"
    assert eval_kind(TinyForMaskedLM(), "auto", None) == "masked_lm"
    assert eval_kind(TinyCausalLM(), "auto", None) == "classification"  # no sign of what it is
    assert eval_kind(TinyCausalLM(), "causal_lm", None) == "causal_lm"
    assert eval_kind(TinyForCausalLM(), "auto", lambda m, b: (b, b)) == "predict_fn"


def test_a_classifier_keeps_sklearns_report() -> None:
    samples = text_samples(64)
    result = autobatch.fit(
        PaddedEncoder(), loader(samples), target_batch=32, eval_data=loader(samples[:32]), **MEMORY, **QUIET
    )
    report = result.report
    assert report is not None and report.kind == "classification"
    assert report.loss is None and report.perplexity is None and "precision" in report.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eval_task": "causal_lm", "predict_fn": lambda m, b: b}, "`predict_fn` and `eval_task"),
        ({"eval_task": "causal_lm", "target_names": ["a", "b"]}, "no `target_names`"),
        ({"eval_task": "lm"}, "`eval_task` to be one of"),
    ],
)
def test_evaluation_options_that_contradict_each_other_are_refused(
    options: dict[str, Any], message: str
) -> None:
    samples = text_samples(16)
    with pytest.raises(ValueError, match=message):
        autobatch.fit(
            TinyCausalLM(),
            loader(samples, lm_collate),
            target_batch=8,
            eval_data=loader(samples, lm_collate),
            **options,
        )


# -- nothing fits -----------------------------------------------------------------------------------


def test_no_batch_fits_names_the_model_state_and_the_smallest_limit_that_does() -> None:
    samples = text_samples(32)
    with pytest.raises(NoBatchFitsError) as caught:
        autobatch.probe(PaddedEncoder(), loader(samples), **{**MEMORY, "memory_limit": "96KiB"})
    error = caught.value
    state = error.model_state
    assert state is not None and not state.estimated
    assert state.weights > 0 and state.gradients > 0 and state.optimizer >= 2 * state.gradients
    for words in ("weights", "gradients", "optimizer state", "memory_limit="):
        assert words in str(error)
    assert error.needed_bytes is not None and error.needed_bytes > state.total
    # The figure is the smallest limit that does: at it a batch fits, a little below it none does.
    assert (
        autobatch.probe(
            PaddedEncoder(), loader(samples), **{**MEMORY, "memory_limit": error.needed_bytes}
        ).micro_batch
        >= 1
    )
    with pytest.raises(NoBatchFitsError):
        autobatch.probe(
            PaddedEncoder(), loader(samples), **{**MEMORY, "memory_limit": int(error.needed_bytes * 0.97)}
        )


def test_where_nothing_is_roomier_the_optimizer_state_is_estimated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DeviceMemory, "roomy", lambda self, **_: None)
    with pytest.raises(NoBatchFitsError) as caught:
        autobatch.probe(PaddedEncoder(), loader(text_samples(16)), **{**MEMORY, "memory_limit": "96KiB"})
    state = caught.value.model_state
    assert state is not None and state.estimated and caught.value.needed_bytes is None
    assert state.optimizer == 2 * state.gradients  # AdamW's two moments, never made
    assert "estimated" in str(caught.value) and "a larger memory_limit" in str(caught.value)
