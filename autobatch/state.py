"""Snapshot and restore everything a training step changes, bit for bit.

The probe runs real optimizer steps; afterwards the model must be exactly as it was: parameters, buffers
(BatchNorm running statistics), ``requires_grad`` flags, gradients, train/eval mode, optimizer state and
hyper-parameters, GradScaler state, and the random number generators (torch CPU and CUDA, Python's
``random``, NumPy's global generator). Copies are kept on the host so that a snapshot costs no device
memory while the probe measures it.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Snapshot", "snapshot"]


@dataclass(frozen=True)
class _Saved:
    """A host copy of a tensor and the device it came from."""

    data: torch.Tensor
    device: torch.device

    def put_back(self, current: Any) -> torch.Tensor:
        """Write into ``current`` in place when it still matches, else a fresh copy on the old device."""
        if (
            isinstance(current, torch.Tensor)
            and current.shape == self.data.shape
            and current.dtype == self.data.dtype
            and current.device == self.device
        ):
            with torch.no_grad():
                current.copy_(self.data)
            return current
        return self.data.to(self.device, copy=True)


def _host_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _Saved(value.detach().to("cpu", copy=True), value.device)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return copy.deepcopy(value)


def _put_back(current: Any, saved: Any) -> Any:
    return saved.put_back(current) if isinstance(saved, _Saved) else copy.deepcopy(saved)


@dataclass
class Snapshot:
    """What :func:`snapshot` took; :meth:`restore` writes it back."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None
    tensors: list[tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]]
    modes: list[tuple[nn.Module, bool]]
    optimizer_state: dict[Any, dict[str, Any]]
    param_groups: list[dict[str, Any]]
    scaler_state: dict[str, Any]
    rng: dict[str, Any]

    def restore(self) -> None:
        """Put everything back as it was when the snapshot was taken."""
        with torch.no_grad():
            for tensor, data, requires_grad, grad in self.tensors:
                tensor.copy_(data)
                if tensor.is_leaf:
                    tensor.requires_grad_(requires_grad)
                    tensor.grad = None if grad is None else grad.to(tensor.device)
        for module, training in self.modes:
            module.training = training
        if self.optimizer is not None:
            restored: dict[Any, dict[str, Any]] = {}
            for param, state in self.optimizer_state.items():
                now = self.optimizer.state.get(param, {})
                restored[param] = {key: _put_back(now.get(key), value) for key, value in state.items()}
            self.optimizer.state.clear()
            self.optimizer.state.update(restored)
            for group, saved in zip(self.optimizer.param_groups, self.param_groups, strict=True):
                params = group["params"]
                group.clear()
                group.update(copy.deepcopy(saved))
                group["params"] = params
        if self.scaler is not None:
            _restore_scaler(self.scaler, self.scaler_state)
        _set_rng(self.rng)


def _scaler_tensors(scaler: torch.amp.GradScaler) -> dict[str, Any]:
    return {k: _host_copy(v) for k, v in vars(scaler).items() if k != "_per_optimizer_states"}


def _restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    for key, value in saved.items():
        setattr(scaler, key, _put_back(getattr(scaler, key, None), value))
    per_optimizer = getattr(scaler, "_per_optimizer_states", None)
    if per_optimizer is not None:
        per_optimizer.clear()


def _get_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with scikit-learn
        pass
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def snapshot(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Snapshot:
    """Take a host-side copy of everything a training step changes.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> before = model.weight.clone()
        >>> snap = snapshot(model)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1)
        >>> snap.restore()
        >>> torch.equal(model.weight, before)
        True
    """
    seen: set[int] = set()
    tensors = []
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        grad = t.grad.detach().to("cpu", copy=True) if t.grad is not None else None
        tensors.append((t, t.detach().to("cpu", copy=True), t.requires_grad, grad))
    optimizer_state: dict[Any, dict[str, Any]] = {}
    param_groups: list[dict[str, Any]] = []
    if optimizer is not None:
        optimizer_state = {p: _host_copy(dict(s)) for p, s in optimizer.state.items()}
        param_groups = [
            copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups
        ]
    return Snapshot(
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        tensors=tensors,
        modes=[(m, m.training) for m in model.modules()],
        optimizer_state=optimizer_state,
        param_groups=param_groups,
        scaler_state=_scaler_tensors(scaler) if scaler is not None else {},
        rng=_get_rng(),
    )
