"""One micro-step and one optimizer step of one model, shared by the probe and the training loop.

The probe measures exactly what the loop will run: the same autocast forward, loss, weighting, scaled
backward, unscale, clipping, ``scaler.step`` and ``scaler.update`` (the order of nanoGPT's train.py). How
the micro-steps of a step and its optimizer step are put together, on every rank, is
:mod:`autobatch.step.transaction`'s job.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.memory.device import DeviceMemory
from autobatch.memory.footprint import kept_tensors
from autobatch.options import PRECISIONS

__all__ = [
    "LossFn",
    "StepFn",
    "StepResult",
    "Stepper",
    "batchnorm_layers",
    "compute_loss",
    "resolve_precision",
    "smallest_batch",
]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

LossFn = Callable[[Any, Any], torch.Tensor]
StepFn = Callable[[nn.Module, Any], torch.Tensor]


def _autocast_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.amp.autocast(device.type, dtype=dtype):
            pass
    return not any("not supported" in str(w.message) for w in caught)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Resolve ``precision`` for ``device`` to ``"fp16"``, ``"bf16"`` or ``"fp32"``.

    ``"auto"`` is fp16 (with a GradScaler) on CUDA, bf16 where the device's autocast supports it, and
    fp32 otherwise.

    Raises:
        UsageValueError: ``precision`` is unknown, or the device's autocast does not support it.

    Example:
        >>> resolve_precision("auto", torch.device("cpu"))
        'bf16'
    """
    if precision not in PRECISIONS:
        raise UsageValueError(
            f"Expected `precision` to be one of {', '.join(map(repr, PRECISIONS))}, but got {precision!r}."
        )
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if _autocast_supported(device, torch.bfloat16) else "fp32"
    if precision != "fp32" and not _autocast_supported(device, _DTYPES[precision]):
        raise UsageValueError(
            f"`precision={precision!r}` is not supported by autocast on device {str(device)!r}. "
            f"Use precision='auto' or 'fp32'."
        )
    return precision


def _describe_output(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {sorted(map(str, output))}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)}"
    return f"a {type(output).__name__}"


def _default_loss(output: Any, targets: Any) -> torch.Tensor:
    """Cross-entropy of a tensor of logits; any other output is a usage error that says what to pass."""
    if isinstance(output, torch.Tensor):
        return nn.functional.cross_entropy(output, targets)
    if isinstance(output, Mapping):
        pick = "outputs['logits']" if "logits" in output else "outputs['KEY']"
    elif hasattr(output, "logits"):
        pick = "outputs.logits"
    else:
        pick = "outputs[0]"
    raise UsageTypeError(
        f"The model returned {_describe_output(output)}, but the default loss is cross-entropy on a tensor "
        f"of logits. Pass loss_fn=lambda outputs, targets: torch.nn.functional.cross_entropy({pick}, "
        "targets) (with the entry that holds your logits), or step_fn=lambda model, batch: loss."
    )


def compute_loss(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    step_fn: StepFn | None = None,
) -> torch.Tensor:
    """The loss of one batch, before any weighting.

    * ``step_fn(model, batch)`` when given (the escape hatch for anything else);
    * a dict batch (Hugging Face style): ``model(**batch).loss``;
    * a sequence ``(*inputs, targets)``: ``loss_fn(model(*inputs), targets)``, cross-entropy by default.
    """
    if step_fn is not None:
        return step_fn(model, batch)
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise UsageValueError(
                "A dict batch is passed as model(**batch), whose output must carry a `loss` (as "
                "Hugging Face models do when the batch has `labels`); got an output without one. "
                "Pass `step_fn=lambda model, batch: ...` to compute the loss yourself."
            )
        return loss
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        *inputs, targets = batch
        output = model(*inputs)
        return (loss_fn or _default_loss)(output, targets)
    raise UsageValueError(
        "Expected each batch to be a dict or a sequence (inputs, targets), but got "
        f"{type(batch).__name__}. Pass `step_fn=lambda model, batch: loss` for other layouts."
    )


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model``: their statistics depend on the micro-batch."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a forward in training mode updates in place: BatchNorm's and InstanceNorm's running
    mean, variance and batch count (where they track them)."""
    tensors = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                value = getattr(module, name, None)
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
    return tensors


def smallest_batch(model: nn.Module) -> int:
    """The smallest batch ``model`` can train on: 2 with BatchNorm ("Expected more than 1 value per
    channel" in training mode), else 1."""
    return 2 if batchnorm_layers(model) else 1


@dataclass(frozen=True)
class StepResult:
    """What an optimizer step did: ``applied`` unless skipped, and whether its loss was non-finite."""

    applied: bool
    nonfinite: bool = False


class Stepper:
    """Runs the micro-steps and the optimizer steps of one model on one device in one precision.

    Args:
        model: the model, already on ``memory.device``; its parameters are the ones trained.
        optimizer: its optimizer.
        memory: the device memory the batches are moved to.
        precision: a resolved precision (see :func:`resolve_precision`).
        forward: the module that runs the forward (a DDP wrapper of ``model``), default ``model``.
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        step_fn: ``step_fn(model, batch) -> loss`` replaces the forward and loss entirely.
        grad_clip: clip the gradient norm to this value after unscaling, or ``None``.
        scaler: the GradScaler to use; by default one enabled only for fp16.
        skip_nonfinite: skip (do not apply) an optimizer step whose loss is NaN or infinite, or whose
            clipped gradient norm is; the probe measures every step instead, so it passes ``False``.
        values: whether the step may read tensor values; ``False`` on fake tensors (a prediction), where
            the loss reads as 0.0 (and ``skip_nonfinite`` must be ``False``).
        kernels: a :class:`~autobatch.step.cudakernels.KernelPolicy` whose region wraps the autocast
            forward (a prediction for a GPU), or ``None``.
        runtime: tensors the runtime keeps on the device before the first step (a prediction's cuBLAS
            workspaces): resident from the start, first of all.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        memory: DeviceMemory,
        precision: str,
        *,
        forward: nn.Module | None = None,
        loss_fn: LossFn | None = None,
        step_fn: StepFn | None = None,
        grad_clip: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        skip_nonfinite: bool = True,
        values: bool = True,
        kernels: Any = None,
        runtime: Sequence[torch.Tensor] = (),
    ) -> None:
        self.model = model
        self.forward_module = forward if forward is not None else model
        self.optimizer = optimizer
        self.memory = memory
        self.precision = precision
        self.loss_fn = loss_fn
        self.step_fn = step_fn
        self.grad_clip = grad_clip
        self.skip_nonfinite = skip_nonfinite
        self.values = values
        self.kernels = kernels
        self.runtime = list(runtime)
        self.device_type = memory.device.type
        self.dtype = _DTYPES[precision]
        if scaler is None:
            scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")
        if scaler.is_enabled() and getattr(scaler, "_scale", None) is None:
            # Its scale and growth tracker are made on the device by the first scale(); made now, they are
            # resident from the start, and the first step allocates what every later one does.
            scaler.scale(torch.ones((), device=memory.device))
        self.scaler = scaler
        self._loss: torch.Tensor | None = None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.norm_statistics = running_statistics(model)
        # How far the optimizer step under way got: its gradients are unscaled, clipped.
        self.unscaled = self.clipped = False

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast region of the forward pass (none in fp32)."""
        region: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext()
            if self.precision == "fp32"
            else torch.autocast(self.device_type, dtype=self.dtype)
        )
        return region if self.kernels is None else self.kernels.region(region)

    def forward_backward(self, batch: Any, weight: float = 1.0) -> torch.Tensor:
        """Forward and scaled backward of one micro-batch; returns its unweighted loss, detached.

        ``weight`` is the micro-batch's share of the step (its samples or items over the step's total, all
        ranks together), so that the accumulated gradient equals the gradient of the whole batch. The
        weighted losses add up to the step's loss (:meth:`pending_loss`).
        """
        self.memory.mark("micro")
        batch = self.memory.transfer(batch)
        with self.autocast():
            loss = compute_loss(self.forward_module, batch, self.loss_fn, self.step_fn)
        self._check_loss(loss)
        self.scaler.scale(loss * weight).backward()
        loss = loss.detach()
        # Summed here, inside the region the probe measures, so that the loop holds no device tensor
        # during its micro-steps that the probe did not count.
        if self._loss is None:
            self._loss = loss.float() * weight
        else:
            self._loss.add_(loss, alpha=weight)
        return loss

    def _check_loss(self, loss: Any) -> None:
        """Refuse a loss that cannot be backpropagated, naming where it came from and what it was."""
        source = "the loss"
        if self.step_fn is not None or self.loss_fn is not None:
            source = "`step_fn`" if self.step_fn is not None else "`loss_fn`"
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else repr(loss)
            raise UsageValueError(
                f"Expected {source} to return the loss as a scalar tensor, but it returned {got} "
                f"({type(loss).__name__})."
            )
        if not (loss.is_floating_point() or loss.is_complex()):
            raise UsageTypeError(
                f"Expected {source} to return a floating-point loss (it is backpropagated), but it returned "
                f"{loss!r}, of dtype {loss.dtype}. Return the loss computed from the model's outputs, e.g. "
                "torch.nn.functional.cross_entropy(model(x), y), not a count or an argmax."
            )
        if not loss.requires_grad:
            raise UsageValueError(
                f"Expected {source} to return a loss that depends on the model's trainable parameters, but "
                f"it returned {loss!r}, which does not require grad (computed under torch.no_grad(), "
                "detached, or made from .item()?)."
            )

    def save_statistics(self) -> list[torch.Tensor]:
        """Copies of the normalisation layers' running statistics, on the device (no sync)."""
        with torch.no_grad():
            return [t.clone() for t in self.norm_statistics]

    def restore_statistics(self, saved: list[torch.Tensor]) -> None:
        """Put back what :meth:`save_statistics` copied: the forwards of a step that is redone updated
        the running statistics once already, and must not count those samples twice."""
        with torch.no_grad():
            for tensor, copy in zip(self.norm_statistics, saved, strict=True):
                tensor.copy_(copy)

    def pending_loss(self) -> float:
        """The weighted loss of the micro-steps since the last step, as a number (a device sync); 0.0 where
        the step reads no values."""
        return float(self._loss) if self._loss is not None and self.values else 0.0

    def materialise_gradients(self) -> None:
        """Give every trainable parameter a gradient (zeros where none flowed), so summing them across
        ranks allocates nothing."""
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def optimizer_step(
        self, loss: float | None = None, update: Callable[[], bool] | None = None
    ) -> StepResult:
        """Unscale, clip, step and update: once per effective batch.

        Args:
            loss: the step's loss over every rank (default: :meth:`pending_loss`).
            update: a framework's own optimizer step, run instead of all of this (the Hugging Face
                Trainer's: its loop has clipped, and its optimizer steps and updates the scaler; the
                framework zeroes the gradients after it); returns whether it applied the update.

        A step is not applied when the GradScaler finds inf/NaN gradients (fp16; the scaler then lowers
        its scale) or, with ``skip_nonfinite``, when the loss or the clipped gradient norm is NaN or
        infinite. The gradients are zeroed either way.
        """
        self.memory.mark("optimizer")
        if update is not None:
            applied = bool(update())
            self._loss = None
            return StepResult(applied=applied)
        if loss is None:
            loss = self.pending_loss()
        if self.skip_nonfinite and not math.isfinite(loss):
            self.discard_step()
            return StepResult(applied=False, nonfinite=True)
        scaler = self.scaler
        # Each stage runs once per step, also when the step is tried again after an out-of-memory.
        if not self.unscaled and (scaler.is_enabled() or self.grad_clip is not None):
            scaler.unscale_(self.optimizer)  # a disabled scaler does nothing
            self.unscaled = True
        if self.grad_clip is not None and not self.clipped:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
            self.clipped = True
            if self.skip_nonfinite and not scaler.is_enabled() and not bool(torch.isfinite(norm)):
                self.discard_step()
                return StepResult(applied=False, nonfinite=True)
        if scaler.is_enabled():
            before = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            applied = scaler.get_scale() >= before
        else:
            self.optimizer.step()
            applied = True
        self.optimizer.zero_grad(set_to_none=True)
        self._loss = None
        self.unscaled = self.clipped = False
        return StepResult(applied=applied)

    def discard_step(self) -> None:
        """Forget the step under way: gradients, its loss and the scaler's per-step stage."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        self._loss = None
        self.unscaled = self.clipped = False
        # GradScaler has no public reset of its per-optimizer stage ("unscaled", "stepped"); a step
        # dropped between unscale_ and update would otherwise make the next unscale_ raise.
        per_optimizer = getattr(self.scaler, "_per_optimizer_states", None)
        if per_optimizer is not None:
            per_optimizer.clear()

    def weight_tensors(self) -> list[torch.Tensor]:
        """What the step keeps on the device before its first step: the runtime's tensors, parameters,
        buffers, the scaler's state and what the model's modules keep in plain attributes
        (:func:`~autobatch.memory.footprint.kept_tensors`)."""
        tensors = [*self.runtime, *self.model.parameters(), *self.model.buffers()]
        tensors += [v for v in vars(self.scaler).values() if isinstance(v, torch.Tensor)]
        return tensors + kept_tensors(self.model)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the step keeps on the device between steps (the emulated device's residents): the
        weight tensors, then gradients and the optimizer's state (made by the first step)."""
        tensors = self.weight_tensors()
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        return tensors + self.optimizer_state()

    def optimizer_state(self) -> list[torch.Tensor]:
        """The optimizer's state tensors on the device. Not the step counters torch's optimizers keep as
        0-dim host tensors (unless capturable or fused): on a GPU they take no device memory, and an
        emulated CPU device must not count them either."""
        return [
            v
            for state in self.optimizer.state.values()
            for key, v in state.items()
            if isinstance(v, torch.Tensor) and not (key == "step" and v.ndim == 0 and v.device.type == "cpu")
        ]
