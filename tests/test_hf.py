"""Hugging Face models through autobatch: a tiny BERT classifier and GPT-2, with the standard collators.

Models, tokenizer and data come from :mod:`tests.hf_fixtures` (built from configs, nothing downloaded).

The memory caps below were found by a scan over 20-80 MiB (4 MiB steps) with ``try_batch`` on tiny
datasets of just the batch's samples: the ``k`` longest of ``classification_samples()`` ("longest"), and
the ``k - 1`` longest with the shortest ("mixed", padded to 128 tokens, so BERT builds its 4-D attention
mask). Largest ``k`` that fits, eager attention, AdamW, emulation "ideal", torch 2.13, transformers 5.24:

    cap (MiB)    20     24     28     32     36     40 … 80
    fp32       15/14  18/17  21/20  24/23  27/26  equal (29/29 … 59/59)
    bf16       24/15  27/19  27/22  27/25  equal  (29/29 … 65/65)

At 128 tokens a sample costs 1.32 MB in fp32 and the mask adds 64 KiB (a float ``(1, 128, 128)``); in
bf16 a sample costs 0.80 MB, but the fp32 mask added to the bf16 attention scores promotes the softmax
and dropout to fp32: 1.26 MB. Only 27 samples have 128 tokens, so from ``k = 28`` on the "longest" batch
is padded too, and both cases cost the same. bf16 at 20 MiB has the widest gap (24 vs 15): the tests of
the mixed case use it.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import autobatch
from autobatch.errors import NoBatchFitsError
from tests import hf_fixtures as hf

pytest.importorskip("transformers")

CAP = "20MiB"
MEMORY: dict[str, Any] = {"memory_limit": CAP, "emulation": "ideal", "precision": "bf16", "device": "cpu"}
QUIET: dict[str, Any] = {"seed": 0, "progress": False}


@pytest.fixture(scope="module")
def longest_only() -> int:
    """The largest batch of the longest samples alone that fits at CAP (24 with transformers 5.24; the
    mixed case: 15), measured on a dataset of only the longest samples, which nothing pads."""
    samples = hf.classification_samples()
    longest = [s for s in samples if len(s["input_ids"]) == max(len(t["input_ids"]) for t in samples)]
    data = hf.loader(longest, hf.padding_collator())
    fitting = [
        b
        for b in range(1, len(longest) + 1)
        if autobatch.try_batch(hf.bert_classifier(), data, b, **MEMORY).fitted
    ]
    assert fitting and max(fitting) < len(longest), "CAP must decide, not the number of long samples"
    return max(fitting)


@pytest.fixture
def bert_data() -> Any:
    """``classification_samples()`` as a DataLoader with ``DataCollatorWithPadding``."""
    return hf.loader(hf.classification_samples(), hf.padding_collator())


def test_each_micro_batch_is_padded_to_its_own_longest_sample() -> None:
    samples = hf.classification_samples()
    collator = hf.RecordingCollator(hf.padding_collator())
    model = hf.bert_classifier()
    seen: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    result = autobatch.fit(
        model,
        hf.loader(samples, collator),
        target_batch=32,
        micro_batch=8,
        memory_limit=CAP,
        emulation="ideal",
        precision="fp32",
        device="cpu",
        **QUIET,
    )
    assert (result.plan.micro_batch, result.plan.accumulation_steps) == (8, 4)
    assert result.backoffs == []
    calls = collator.calls
    # One collation per micro-batch (never one per 32-sample step), every sample once.
    assert [len(lengths) for lengths, _ in calls] == [8] * (len(samples) // 8)
    assert sorted(n for lengths, _ in calls for n in lengths) == sorted(len(s["input_ids"]) for s in samples)
    for lengths, shape in calls:
        assert shape == (len(lengths), max(lengths))
    assert seen == [shape for _, shape in calls]  # the model trains on those batches, as collated
    # Padding to the step's longest sample instead would make every micro-batch of a step as wide.
    steps = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    narrower = [shape[1] < max(max(lengths) for lengths, _ in step) for step in steps for _, shape in step]
    assert sum(narrower) >= len(calls) // 2


def test_probe_fits_batches_mixing_longest_and_shortest(bert_data: Any, longest_only: int) -> None:
    model = hf.bert_classifier()
    probed = autobatch.probe(model, bert_data, cache=False, **MEMORY)
    micro = probed.micro_batch
    # Every sample once, in 26 steps of one micro-batch each: the 27 samples of 128 tokens land in
    # micro-batches with shorter ones, which BERT pads and masks.
    result = autobatch.fit(model, bert_data, target_batch=micro, micro_batch=micro, **MEMORY, **QUIET)
    assert result.optimizer_steps >= 20
    assert result.backoffs == [], f"micro-batch {micro} from the probe ran out of memory in training"
    assert any(trial.case == "mixed" for trial in probed.trials)
    assert micro < longest_only
    # The largest that fits, not merely one that fits.
    assert not autobatch.try_batch(hf.bert_classifier(), bert_data, micro + 1, **MEMORY).fitted


def test_backoff_goes_to_the_largest_micro_batch_that_fits(bert_data: Any, longest_only: int) -> None:
    result = autobatch.fit(
        hf.bert_classifier(),
        bert_data,
        target_batch=2 * longest_only,
        micro_batch=longest_only,
        **MEMORY,
        **QUIET,
    )
    assert result.backoffs, f"micro-batch {longest_only} should not fit a mixed batch at {CAP}"
    first = result.backoffs[0]
    assert first.from_micro == longest_only
    # The exhaustive answer: the largest batch below it whose longest and mixed batches both fit.
    largest = next(
        b
        for b in range(longest_only - 1, 0, -1)
        if autobatch.try_batch(hf.bert_classifier(), bert_data, b, **MEMORY).fitted
    )
    assert largest != longest_only // 2  # or halving would pass too
    # With micro_batch given no probe ran, so the memory model's fixed part is the model state: BERT's
    # workspace is not in it, and the first measured size may be one too many; the next failure is
    # measured too. (With a probe's memory model the first back-off is exact: tests/test_text.py.)
    assert largest <= first.to_micro <= largest + 1
    assert [b.to_micro for b in result.backoffs][-1] == largest
    assert len(result.backoffs) <= 2  # it fits every batch from then on


def _token_stats(
    model: nn.Module, samples: list[dict[str, Any]], collator: Any, batch_size: int
) -> tuple[float, float, float, int]:
    """Shifted token accuracy, unshifted token accuracy, mean token loss and tokens, by hand."""
    was_training = model.training
    model.eval()
    correct = plain = total = plain_total = 0
    loss = 0.0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collator(samples[start : start + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            # Position t predicts token t + 1.
            shifted_logits, targets = logits[:, :-1], labels[:, 1:]
            keep = targets != -100
            correct += int((shifted_logits.argmax(-1)[keep] == targets[keep]).sum())
            total += int(keep.sum())
            loss += float(nn.functional.cross_entropy(shifted_logits[keep], targets[keep], reduction="sum"))
            keep_plain = labels != -100
            plain += int((logits.argmax(-1)[keep_plain] == labels[keep_plain]).sum())
            plain_total += int(keep_plain.sum())
    model.train(was_training)
    return correct / total, plain / plain_total, loss / total, total


def test_causal_lm_evaluation_is_shifted_token_accuracy_and_perplexity() -> None:
    collator = hf.lm_collator()
    test = hf.lm_samples(96, seed=1)
    model = hf.gpt2_lm()
    result = autobatch.fit(
        model,
        hf.loader(hf.lm_samples(), collator),
        target_batch=32,
        micro_batch=8,
        epochs=2,
        eval_data=hf.loader(test, collator),
        precision="fp32",
        device="cpu",
        **QUIET,
    )
    report = result.report
    assert report is not None
    assert report.kind == "causal_lm"
    assert report.perplexity == pytest.approx(math.exp(report.loss))
    shifted, unshifted, loss, tokens = _token_stats(model, test, collator, report.batch_size)
    assert report.tokens == tokens
    assert report.accuracy == pytest.approx(shifted)
    assert report.accuracy != pytest.approx(unshifted)
    assert report.loss == pytest.approx(loss, rel=1e-4)
    # A short summary, not a classification report with a line per token id.
    lines = report.text.splitlines()
    assert len(lines) < 20
    assert not [line for line in lines if re.match(r"\s*\d+\s+\d\.\d+\s+\d\.\d+", line)]


def test_classifier_evaluation_is_sklearns_classification_report() -> None:
    from sklearn.metrics import classification_report

    collator = hf.padding_collator()
    test = hf.classification_samples(96, seed=1, num_labels=3)
    model = hf.bert_classifier(num_labels=3)
    result = autobatch.fit(
        model,
        hf.loader(hf.classification_samples(num_labels=3), collator),
        target_batch=32,
        micro_batch=8,
        eval_data=hf.loader(test, collator),
        precision="fp32",
        device="cpu",
        **QUIET,
    )
    report = result.report
    assert report is not None
    assert report.kind == "classification"
    model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(test), report.batch_size):
            batch = collator(test[start : start + report.batch_size])
            predictions.append(model(**batch).logits.argmax(-1))
    y_pred = torch.cat(predictions).numpy()
    y_true = np.array([s["labels"] for s in test])
    assert report.text == classification_report(y_true, y_pred, digits=4, zero_division=0)
    assert report.accuracy == pytest.approx(float((y_true == y_pred).mean()))


def test_no_batch_fits_names_the_model_state_and_the_memory_needed(bert_data: Any) -> None:
    options: dict[str, Any] = {"emulation": "ideal", "precision": "fp32", "device": "cpu", "cache": False}
    model = hf.bert_classifier()
    # Above the model state (weights + gradients + AdamW's moments, 0.87 MB), below one step at batch 1
    # (2.26 MB at 128 tokens).
    limit = 1536 * 1024
    with pytest.raises(NoBatchFitsError) as caught:
        autobatch.probe(model, bert_data, memory_limit=limit, **options)
    exc = caught.value
    state = exc.model_state
    assert state is not None
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert state.weights >= trainable > 0
    assert state.gradients == trainable
    assert state.optimizer == pytest.approx(2 * trainable, rel=0.01)  # AdamW: two moments
    for name in ("weights", "gradients", "optimizer state"):
        assert name in str(exc)
    assert exc.needed_bytes is not None and exc.needed_bytes > limit
    fitted = autobatch.probe(hf.bert_classifier(), bert_data, memory_limit=exc.needed_bytes, **options)
    assert fitted.micro_batch >= 1
    with pytest.raises(NoBatchFitsError):
        autobatch.probe(hf.bert_classifier(), bert_data, memory_limit=int(exc.needed_bytes * 0.97), **options)


@pytest.mark.parametrize("build", [hf.bert_classifier, hf.gpt2_lm], ids=["bert", "gpt2"])
def test_probe_cache_keys_and_reuses_a_transformers_model(build: Any) -> None:
    # The cache key hashes the code of the model's classes, transformers' included.
    collator = hf.padding_collator() if build is hf.bert_classifier else hf.lm_collator()
    samples = hf.classification_samples(64) if build is hf.bert_classifier else hf.lm_samples(64)
    data = hf.loader(samples, collator)
    first = autobatch.probe(build(), data, **MEMORY)
    again = autobatch.probe(build(), data, **MEMORY)
    assert not first.cached
    assert again.cached and again.verified
    assert again.micro_batch == first.micro_batch
