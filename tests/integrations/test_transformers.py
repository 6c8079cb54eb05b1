"""Tests for autobatch.integrations.transformers: AutoBatchTrainer, counted and compared from outside.

Tiny models from configs (dropout off) on the CPU's emulated device, SGD at a constant rate: the weights of
an AutoBatchTrainer written for 8 × 4 accumulated must equal those of the plain Trainer at one batch of 32
(the same samples in the same order), under a limit where 32 does not fit whole, with a loss that ignores
``num_items_in_batch`` (BERT) and one that divides by it (GPT-2). Runs under torchrun are in
``test_distributed.py`` of this folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer

import autobatch
from autobatch.integrations.transformers import AutoBatchTrainer
from tests.hf_fixtures import classification_samples, lm_collator, lm_samples, padding_collator
from tests.integrations.hf_helpers import (
    LIMIT,
    Watch,
    arguments,
    bert,
    flat,
    gpt2,
    inject_oom,
    losses,
    rel_err,
)

N = 96  # three steps of 32 an epoch; two epochs
TOLERANCE = 1e-6  # fp32: the sums of 4 micro-batches against one batch's


@dataclasses.dataclass
class Run:
    trainer: Any
    weights: torch.Tensor
    watch: Watch


def run(
    cls: Any, make: Any, samples: Any, collate: Any, args: Any, *, oom_at: int | None = None, **kw: Any
) -> Run:
    model, watch = make(), Watch()
    trainer = cls(
        model=model, args=args, train_dataset=samples, data_collator=collate, callbacks=[watch], **kw
    )
    if oom_at is not None:
        inject_oom(trainer, oom_at)
    trainer.train()
    return Run(trainer, flat(model), watch)


def tokens_mode() -> str | bool:
    """Non-padding tokens where the Trainer can count them (transformers 5): they do not depend on how
    the micro-batches are padded. transformers 4 counts every position."""
    import transformers

    return "non_padding" if int(transformers.__version__.split(".")[0]) >= 5 else False


@pytest.fixture(scope="module")
def bert_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The plain Trainer at one batch of 32; AutoBatchTrainer written for 8 × 4 (it probes, and saves a
    checkpoint every 3 steps); the same with an out-of-memory injected in step 3."""
    samples, collate = classification_samples(N), padding_collator()
    tmp = tmp_path_factory.mktemp("bert")
    tokens = {"include_num_input_tokens_seen": tokens_mode()}
    runs = {"plain": run(Trainer, bert, samples, collate, arguments(tmp / "plain", 32, 1, **tokens))}
    saving = {"save_strategy": "steps", "save_steps": 3, **tokens}
    runs["autobatch"] = run(
        AutoBatchTrainer, bert, samples, collate, arguments(tmp / "autobatch", **saving), memory_limit=LIMIT
    )
    micro = runs["autobatch"].trainer.probe_result.micro_batch
    runs["oom"] = run(
        AutoBatchTrainer, bert, samples, collate, arguments(tmp / "oom", **tokens), oom_at=2,
        memory_limit=LIMIT, micro_batch=micro,
    )  # fmt: skip
    return runs


def test_every_optimizer_step_sees_exactly_the_target_where_it_does_not_fit_whole(
    bert_runs: dict[str, Run],
) -> None:
    ours = bert_runs["autobatch"]
    probe = ours.trainer.probe_result
    assert ours.trainer.target_batch == 32 and probe.first_failure is not None and probe.first_failure <= 32
    assert ours.watch.step_samples == [32] * 6  # counted in the model's forwards, between optimizer steps
    assert sum(ours.trainer.micro_batches) == 32 and max(ours.trainer.micro_batches) <= probe.micro_batch
    assert ours.trainer.loss_uses_num_items is False and ours.trainer.backoffs == []


def test_a_bert_classifier_s_weights_equal_one_batch_of_the_target(bert_runs: dict[str, Run]) -> None:
    plain, ours = bert_runs["plain"], bert_runs["autobatch"]
    assert rel_err(ours.weights, plain.weights) < TOLERANCE
    assert losses(ours.trainer) == pytest.approx(losses(plain.trainer), rel=1e-5)
    for state in (ours.trainer.state, plain.trainer.state):
        assert (state.global_step, state.epoch, state.max_steps) == (6, 2.0, 6)
    assert ours.watch.step_ends == plain.watch.step_ends == ours.watch.optimizer_steps == 6
    assert ours.trainer.state.num_input_tokens_seen == plain.trainer.state.num_input_tokens_seen
    assert ours.trainer.state.train_batch_size == 32  # the loop's batch: one step


def test_a_causal_lm_whose_loss_divides_by_num_items_equals_one_batch_of_the_target(tmp_path: Path) -> None:
    samples, collate = lm_samples(N), lm_collator()
    plain = run(Trainer, gpt2, samples, collate, arguments(tmp_path / "plain", 32, 1))
    ours = run(AutoBatchTrainer, gpt2, samples, collate, arguments(tmp_path / "ours"), memory_limit=LIMIT)
    assert ours.trainer.probe_result.micro_batch < 32 and ours.watch.step_samples == [32] * 6
    uses = ours.trainer.model_accepts_loss_kwargs  # transformers 5: GPT-2's loss takes num_items_in_batch
    assert ours.trainer.loss_uses_num_items is uses
    assert rel_err(ours.weights, plain.weights) < TOLERANCE
    assert losses(ours.trainer) == pytest.approx(losses(plain.trainer), rel=1e-5)


def test_a_micro_batch_too_large_for_the_device_backs_off_by_measure_and_regrows(
    bert_runs: dict[str, Run], tmp_path: Path
) -> None:
    samples, collate = classification_samples(N), padding_collator()
    ours = run(
        AutoBatchTrainer, bert, samples, collate, arguments(tmp_path), memory_limit=LIMIT, micro_batch=16,
        regrow_after=2,
    )  # fmt: skip
    backoffs, regrowths = ours.trainer.backoffs, ours.trainer._runner.regrowths
    assert [(b.epoch, b.step, b.from_micro, b.to_micro) for b in backoffs] == [
        (0, 0, 16, 9),
        (0, 2, 16, 9),
        (1, 4, 16, 9),
    ]
    assert [(r.from_micro, r.to_micro) for r in regrowths] == [(9, 16)] * 3  # after 2 clean steps
    assert rel_err(ours.weights, bert_runs["plain"].weights) < TOLERANCE


def test_its_optimizer_scheduler_clipping_and_gradient_checkpointing_are_the_trainer_s(
    bert_runs: dict[str, Run], tmp_path: Path
) -> None:
    samples, collate = classification_samples(N), padding_collator()
    settings = {
        "optim": "adamw_torch", "learning_rate": 1e-3, "max_grad_norm": 1.0, "lr_scheduler_type": "linear",
        "warmup_steps": 2, "num_train_epochs": 1, "gradient_checkpointing": True,
    }  # fmt: skip
    plain = run(Trainer, bert, samples, collate, arguments(tmp_path / "plain", 32, 1, **settings))
    ours = run(
        AutoBatchTrainer, bert, samples, collate, arguments(tmp_path / "ours", **settings), memory_limit=LIMIT
    )
    assert rel_err(ours.weights, plain.weights) < 1e-5  # AdamW divides by tiny second moments
    assert [e["learning_rate"] for e in ours.trainer.state.log_history if "loss" in e] == [
        e["learning_rate"] for e in plain.trainer.state.log_history if "loss" in e
    ]
    # The probe measured the Trainer's step: with its activations checkpointed, more fits.
    without = bert_runs["autobatch"].trainer.probe_result.max_fitting_batch
    assert ours.trainer.probe_result.max_fitting_batch > without


def test_bf16_runs_under_the_accelerator_s_autocast_in_the_probe_and_the_steps(tmp_path: Path) -> None:
    samples, collate = classification_samples(N), padding_collator()
    settings = {"bf16": True, "num_train_epochs": 1}
    plain = run(Trainer, bert, samples, collate, arguments(tmp_path / "plain", 32, 1, **settings))
    dtypes: set[torch.dtype] = set()

    def watched() -> torch.nn.Module:
        model = bert()
        model.classifier.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
        return model

    ours = run(
        AutoBatchTrainer,
        watched,
        samples,
        collate,
        arguments(tmp_path / "ours", **settings),
        memory_limit=LIMIT,
    )
    assert dtypes == {torch.bfloat16}  # every forward, the probe's included, under the accelerator's autocast
    assert ours.trainer.probe_result.precision == "bf16" and ours.watch.step_samples == [32] * 3
    assert rel_err(ours.weights, plain.weights) < 1e-4  # bf16 products, summed per micro-batch


def test_an_oom_mid_training_backs_off_and_redoes_the_step(bert_runs: dict[str, Run]) -> None:
    clean, hit = bert_runs["autobatch"], bert_runs["oom"]
    (backoff,) = hit.trainer.backoffs
    assert backoff.step == 2 and backoff.to_micro < backoff.from_micro  # step 3 redone with less
    assert rel_err(hit.weights, clean.weights) < TOLERANCE  # nothing lost, nothing twice
    assert losses(hit.trainer) == pytest.approx(losses(clean.trainer), rel=1e-5)
    assert hit.trainer.state.global_step == 6 and hit.trainer.state.epoch == 2.0
    assert hit.watch.step_ends == hit.watch.optimizer_steps == 6 and hit.watch.begins == 1
    tokens = clean.trainer.state.num_input_tokens_seen
    assert hit.trainer.state.num_input_tokens_seen == tokens  # the failed attempt is not counted


def resumable() -> bool:
    """Whether a Trainer can resume here: before transformers allow-listed numpy in its RNG state's
    ``torch.load`` (``trainer_pt_utils.safe_globals``), torch 2.6's ``weights_only=True`` default refuses it,
    and no Trainer resumes (huggingface/transformers#34631)."""
    from transformers import trainer_pt_utils

    torch_version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return hasattr(trainer_pt_utils, "safe_globals") or torch_version < (2, 6)


@pytest.mark.skipif(not resumable(), reason="this transformers cannot load its checkpoints' RNG state")
def test_a_resumed_run_goes_on_with_the_checkpoint_s_micro_batch(
    bert_runs: dict[str, Run], tmp_path: Path
) -> None:
    first = bert_runs["autobatch"]
    checkpoint = Path(first.trainer.args.output_dir) / "checkpoint-3"
    model, watch = bert(), Watch()
    resumed = AutoBatchTrainer(
        model=model, args=arguments(first.trainer.args.output_dir), train_dataset=classification_samples(N),
        data_collator=padding_collator(), callbacks=[watch], memory_limit=LIMIT,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.probe_result is None  # not probed again
    assert resumed.micro_batch == first.trainer.micro_batch
    assert resumed.state.global_step == 6 and watch.step_samples == [32] * 3
    assert rel_err(flat(model), first.weights) < TOLERANCE


def test_an_oom_in_the_optimizer_step_that_changed_nothing_is_tried_again(tmp_path: Path) -> None:
    samples, collate = classification_samples(64), padding_collator()
    adam = {"optim": "adamw_torch", "learning_rate": 1e-3, "num_train_epochs": 1}
    clean = run(AutoBatchTrainer, bert, samples, collate, arguments(tmp_path / "a", **adam), micro_batch=8)
    real, left = torch.optim.Adam._init_group, [1]

    def init_group(self: Any, *args: Any, **kwargs: Any) -> Any:  # AdamW's lazy state: before any change
        if left[0]:
            left[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected in the optimizer's state)")
        return real(self, *args, **kwargs)

    torch.optim.Adam._init_group = init_group  # type: ignore[method-assign]
    try:
        hit = run(AutoBatchTrainer, bert, samples, collate, arguments(tmp_path / "b", **adam), micro_batch=8)
    finally:
        torch.optim.Adam._init_group = real  # type: ignore[method-assign]
    assert left == [0] and torch.equal(hit.weights, clean.weights)  # applied once, bit-identical
    assert hit.watch.optimizer_steps == clean.watch.optimizer_steps == 2


def test_an_oom_in_the_optimizer_step_after_it_changed_weights_stops_training(tmp_path: Path) -> None:
    samples, collate = classification_samples(32), padding_collator()
    model = bert()
    trainer = AutoBatchTrainer(
        model=model, args=arguments(tmp_path), train_dataset=samples, data_collator=collate, micro_batch=8
    )
    real = torch.optim.SGD.step

    def half_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            self.param_groups[0]["params"][0].add_(1.0)
        raise torch.OutOfMemoryError("CUDA out of memory (injected half-way through the update)")

    torch.optim.SGD.step = half_step  # type: ignore[method-assign]
    try:
        with pytest.raises(autobatch.OptimizerStepError, match="step 1, after it had begun") as excinfo:
            trainer.train()
    finally:
        torch.optim.SGD.step = real  # type: ignore[method-assign]
    assert excinfo.value.partial and trainer.state.global_step == 0


# -- what it refuses -----------------------------------------------------------------------------------
def test_the_target_is_the_arguments_product_unless_given(tmp_path: Path) -> None:
    samples = classification_samples(8)
    written = AutoBatchTrainer(model=bert(), args=arguments(tmp_path, 3, 5), train_dataset=samples)
    assert (written.target_batch, written.args.per_device_train_batch_size) == (15, 15)
    assert (
        written.args.gradient_accumulation_steps == 1 and written.user_args.gradient_accumulation_steps == 5
    )
    given = AutoBatchTrainer(
        model=bert(), args=arguments(tmp_path, 3, 5), train_dataset=samples, target_batch=64
    )
    assert given.target_batch == 64


def test_a_target_the_ranks_cannot_share_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))  # as under torchrun
    args = arguments(tmp_path, 4, 4)
    with pytest.raises(autobatch.UsageValueError, match=r"a multiple of the 2 ranks .* but got 33"):
        AutoBatchTrainer(model=bert(), args=args, train_dataset=classification_samples(8), target_batch=33)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"auto_find_batch_size": True}, autobatch.UsageValueError, "auto_find_batch_size=True"),
        ({"optim": "adalomo"}, autobatch.UsageValueError, "steps inside the backward"),
        ({"target_batch": 0}, autobatch.UsageValueError, "`target_batch` to be a positive int"),
        ({"target_batch": "32"}, autobatch.UsageTypeError, "`target_batch` to be a positive int"),
        ({"memory_limt": "8MiB"}, autobatch.UsageTypeError, "Did you mean `memory_limit`"),
        ({"margin": 2.0}, autobatch.UsageValueError, "`margin`"),
        (
            {"micro_batch": 8, "margin": 0.1},
            autobatch.UsageValueError,
            "no probe options with `micro_batch=8`",
        ),
    ],
)
def test_what_it_cannot_do_is_refused_before_anything_changes(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    arg_names = {"auto_find_batch_size", "optim"}
    args = arguments(tmp_path, **{k: v for k, v in kwargs.items() if k in arg_names})
    options = {k: v for k, v in kwargs.items() if k not in arg_names}
    model = bert()
    before = flat(model)
    with pytest.raises(error, match=match):
        AutoBatchTrainer(model=model, args=args, train_dataset=classification_samples(8), **options)
    assert torch.equal(flat(model), before)
