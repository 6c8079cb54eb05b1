"""What a model holds between training steps: its weights, their gradients and the optimizer's state.

"Model state" means one thing everywhere autobatch prints it (the probe's summary, ``NoBatchFitsError``):
the sum of these three. The optimizer's state is measured where it exists; where it does not yet (a step
never completed, so Adam's moments were never made) it is estimated from the optimizer's kind, and says so.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from autobatch.memory.device import tensor_bytes
from autobatch.units import format_bytes

__all__ = ["ModelState", "kept_tensors", "model_state"]

KEPT_SCAN_BUDGET = 20_000
"""Objects :func:`kept_tensors` visits at most: a bound on what a model's attributes reach."""
_KEPT_DEPTH = 6
_MODULE_SLOTS = frozenset({"_parameters", "_buffers", "_modules"})

# Optimizer state per trainable parameter, in parameter-sized tensors, for the state torch's optimizers keep.
_STATE_PER_PARAMETER = {
    "Adam": 2,
    "AdamW": 2,
    "NAdam": 2,
    "RAdam": 2,
    "Adamax": 2,
    "Adadelta": 2,
    "Adagrad": 1,
    "RMSprop": 1,
    "Rprop": 2,
    "ASGD": 1,
}


@dataclass(frozen=True)
class ModelState:
    """Bytes of weights (parameters and buffers), gradients and optimizer state; ``estimated`` when the
    optimizer's share is a guess from its kind (its state did not exist yet)."""

    weights: int
    gradients: int
    optimizer: int
    estimated: bool

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def describe(self) -> str:
        """``'1.20 MiB (weights 400 KiB, gradients 400 KiB, optimizer state 800 KiB, estimated)'``."""
        parts = (
            f"weights {format_bytes(self.weights)}, gradients {format_bytes(self.gradients)}, "
            f"optimizer state {format_bytes(self.optimizer)}" + (", estimated" if self.estimated else "")
        )
        return f"{format_bytes(self.total)} ({parts})"


def _estimated_state(optimizer: torch.optim.Optimizer, trainable: int) -> int:
    kind = type(optimizer).__name__
    groups = optimizer.param_groups
    if kind == "SGD":
        return trainable if any(g.get("momentum", 0) for g in groups) else 0
    per = _STATE_PER_PARAMETER.get(kind, 2)  # unknown optimizers: as much as Adam
    if kind in ("Adam", "AdamW") and any(g.get("amsgrad") for g in groups):
        per += 1
    if kind == "RMSprop":
        per += sum(1 for flag in ("momentum", "centered") if any(g.get(flag) for g in groups))
    return per * trainable


def model_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> ModelState:
    """The model's state between steps: measured, and the optimizer's share estimated where not made yet."""
    weights = tensor_bytes([*model.parameters(), *model.buffers()])
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    trainable = tensor_bytes(trainable_params)
    held = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    estimate = _estimated_state(optimizer, trainable)
    if estimate == 0 or all(optimizer.state.get(p) for p in trainable_params):
        return ModelState(weights, trainable, tensor_bytes(held), estimated=False)
    return ModelState(weights, trainable, estimate, estimated=True)


_FRAMEWORKS = frozenset(
    {"torch", "lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate", "datasets"}
)


def _foreign(value: object) -> bool:
    """Whether ``value`` is a library's object other than a container: a trainer, a datamodule, a hook
    handle; the walk never follows one (it would reach their datasets)."""
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        return False
    top = (type(value).__module__ or "").split(".")[0]
    return top in _FRAMEWORKS


def kept_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Tensors the model's modules keep outside their parameters and buffers: a scratch tensor or a cache
    in a plain attribute, past activations in a list, a tensor inside an object a module holds.

    On a GPU every tensor on the device takes memory however it is referenced; an emulated device counts
    these from the start. The walk follows lists, tuples, dicts, sets and plain objects' attributes, at
    most :data:`KEPT_SCAN_BUDGET` objects deep and wide; functions, classes and modules end it.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> layer.scratch = [torch.zeros(3)]
        >>> [tuple(t.shape) for t in kept_tensors(layer)]
        [(3,)]
    """
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack: list[tuple[object, int]] = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key not in _MODULE_SLOTS:
                stack.append((value, 0))
    while stack and len(seen) < KEPT_SCAN_BUDGET:
        value, depth = stack.pop()
        if id(value) in seen or value is None or isinstance(value, (bool, int, float, str, bytes)):
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if not isinstance(value, nn.Parameter):
                found.setdefault(id(value), value)
            continue
        if depth >= _KEPT_DEPTH or isinstance(value, (nn.Module, type)) or callable(value):
            continue
        if _foreign(value):  # a framework's object (a trainer, a datamodule): not the model's memory
            continue
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in list(value.values()))
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in list(value))
        elif hasattr(value, "__dict__") and not isinstance(value, types.ModuleType):
            stack.extend((v, depth + 1) for v in list(vars(value).values()))
    return list(found.values())
