"""Another trainer's settings from a probe: Hugging Face, Lightning, DeepSpeed and Accelerate.

These trainers take one micro-batch size for every step, so a plan whose chunks differ (``32 = 11 + 11 +
10``) is exported as the nearest exact equal split: the largest divisor of each rank's share of the target
that is not above the probed micro-batch (``8 × 4``), and the settings say what that costs. Where the
trainer has a setting for it, the precision the probe measured is set (``bf16=True``, ``"bf16-mixed"``,
``{"bf16": {"enabled": true}}``, ``mixed_precision="bf16"``) and the optimizer too (Hugging Face's
``optim``, DeepSpeed's ``optimizer.type``); the notes say what the probe measured and where the trainer has
no such setting. Pure: no torch.

Example:
    >>> from autobatch.result import ProbeResult
    >>> probed = ProbeResult(11, 11, 12, None, "cuda:0", "bf16", None, "none", optimizer="AdamW")
    >>> config = trainer_config(probed, "hf", target_batch=32)
    >>> config.settings
    {'per_device_train_batch_size': 8, 'gradient_accumulation_steps': 4, 'bf16': True, 'fp16': False, \
'optim': 'adamw_torch'}
    >>> print(config.notes[0])
    equal micro-batches of 8 (the probe allows 11, as 11+11+10): 4 micro-steps a step instead of 3 (+33%)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autobatch.errors import UsageValueError
from autobatch.planner import plan, uniform_plan
from autobatch.result import ProbeResult

__all__ = ["TOOLS", "TrainerConfig", "trainer_config"]

TOOLS = ("hf", "lightning", "deepspeed", "accelerate")
"""The trainers :func:`trainer_config` writes settings for."""

_HF_OPTIM = {
    "AdamW": "adamw_torch",
    "Adam": "adamw_torch",
    "SGD": "sgd",
    "Adagrad": "adagrad",
    "RMSprop": "rmsprop",
}
_DEEPSPEED_OPTIM = {"AdamW": "AdamW", "Adam": "Adam", "SGD": "SGD", "Adagrad": "Adagrad"}
_LIGHTNING_PRECISION = {"fp16": "16-mixed", "bf16": "bf16-mixed", "fp32": "32-true"}
_ACCELERATE_PRECISION = {"fp16": "fp16", "bf16": "bf16", "fp32": "no"}


@dataclass(frozen=True)
class TrainerConfig:
    """One trainer's settings for a probed micro-batch and a target batch.

    Attributes:
        tool: ``"hf"`` (``TrainingArguments``), ``"lightning"`` (``Trainer`` and the ``DataLoader``'s
            ``batch_size``), ``"deepspeed"`` (the config's keys) or ``"accelerate"`` (``Accelerator`` and
            the ``DataLoader``'s ``batch_size``).
        settings: keyword arguments and keys, to pass as they are (``TrainingArguments(**settings, ...)``).
        notes: what the settings cannot say: the cost of an equal split, the precision and optimizer the
            probe measured where the trainer has no setting for them.
    """

    tool: str
    settings: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"tool", "settings", "notes"}``."""
        return {"tool": self.tool, "settings": dict(self.settings), "notes": list(self.notes)}


def trainer_config(
    probed: ProbeResult | int,
    tool: str,
    *,
    target_batch: int,
    world_size: int = 1,
    precision: str | None = None,
    optimizer: str | None = None,
) -> TrainerConfig:
    """The settings of ``tool`` that train ``target_batch`` samples a step over ``world_size`` ranks, each
    micro-batch within what the probe found.

    Args:
        probed: the probe's result (its micro-batch, precision and optimizer), or a micro-batch.
        tool: one of :data:`TOOLS`.
        target_batch: the effective batch of every optimizer step, over all ranks.
        world_size: the data-parallel ranks.
        precision, optimizer: what was measured, where ``probed`` is a number (``"bf16"``, ``"AdamW"``).

    Raises:
        UsageValueError: an unknown ``tool``, or a target the ranks cannot share.
    """
    if tool not in TOOLS:
        raise UsageValueError(
            f"Expected `tool` to be one of {', '.join(map(repr, TOOLS))}, but got {tool!r}."
        )
    if isinstance(probed, ProbeResult):
        micro, precision, optimizer = probed.micro_batch, probed.precision, probed.optimizer
    else:
        micro = probed
    best, equal = plan(micro, target_batch, world_size), uniform_plan(micro, target_batch, world_size)
    size, steps = equal.chunks[0], equal.accumulation_steps
    notes = []
    if equal.accumulation_steps != best.accumulation_steps:
        more = equal.accumulation_steps / best.accumulation_steps - 1
        notes.append(
            f"equal micro-batches of {size} (the probe allows {micro}, as {'+'.join(map(str, best.chunks))}"
            f"): {steps} micro-steps a step instead of {best.accumulation_steps} (+{more:.0%})"
        )
    settings: dict[str, Any]
    if tool == "hf":
        settings = {"per_device_train_batch_size": size, "gradient_accumulation_steps": steps}
        if precision is not None:
            settings.update(bf16=precision == "bf16", fp16=precision == "fp16")
        if optimizer in _HF_OPTIM:
            settings["optim"] = _HF_OPTIM[optimizer]
    elif tool == "lightning":
        settings = {"batch_size": size, "accumulate_grad_batches": steps}
        if precision is not None:
            settings["precision"] = _LIGHTNING_PRECISION[precision]
        notes.append(_elsewhere("configure_optimizers", optimizer))
    elif tool == "deepspeed":
        settings = {
            "train_micro_batch_size_per_gpu": size,
            "gradient_accumulation_steps": steps,
            "train_batch_size": target_batch,
        }
        if precision in ("fp16", "bf16"):
            settings[precision] = {"enabled": True}
        if optimizer in _DEEPSPEED_OPTIM:
            settings["optimizer"] = {"type": _DEEPSPEED_OPTIM[optimizer]}
    else:
        settings = {"batch_size": size, "gradient_accumulation_steps": steps}
        if precision is not None:
            settings["mixed_precision"] = _ACCELERATE_PRECISION[precision]
        notes.append(_elsewhere("the optimizer you pass to accelerator.prepare", optimizer))
    known = _HF_OPTIM if tool == "hf" else _DEEPSPEED_OPTIM
    if optimizer is not None and tool in ("hf", "deepspeed") and optimizer not in known:
        notes.append(_elsewhere("your optimizer", optimizer))
    if precision is not None:
        notes.append(f"measured in {precision}: train in {precision}, or the micro-batch may not fit")
    return TrainerConfig(tool, settings, tuple(n for n in notes if n))


def _elsewhere(where: str, optimizer: str | None) -> str:
    if optimizer is None:
        return ""
    return (
        f"measured with {optimizer}: use it in {where} (an optimizer with more state, such as Adam instead "
        "of SGD, needs more memory)"
    )
