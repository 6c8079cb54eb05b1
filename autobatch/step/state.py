"""Snapshot and restore everything a training step changes, bit for bit.

The probe runs real optimizer steps; afterwards everything must be exactly as it was:

* each module's parameters and buffers, by module and name, so that a buffer that ``forward`` reassigns out
  of place (``self.seen = self.seen + n``) is put back too, and the values written back in place, so that
  references the user holds stay valid; ``requires_grad`` flags, pending gradients (mid-accumulation) and
  train/eval modes;
* the optimizer, through its own ``state_dict``/``load_state_dict`` (state created by the probe is gone,
  hyper-parameters are back), keeping the identity of its ``param_groups`` dicts;
* a GradScaler, its per-optimizer stage included;
* the random number generators: torch's CPU and CUDA ones, Python's ``random`` and NumPy's global one.

Copies are kept on the host, so a snapshot costs no device memory while the probe measures.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Snapshot", "preserved_rng", "restore_rng", "rng_state", "snapshot"]


def _host(value: Any) -> Any:
    """A deep copy of ``value`` with every tensor copied to the host (detached)."""
    if isinstance(value, torch.Tensor):
        return _Saved(value.detach().to("cpu", copy=True), value.device)
    if isinstance(value, dict):
        return _rebuilt(value, {k: _host(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_host(v) for v in value)
    return copy.deepcopy(value)


def _rebuilt(original: dict[Any, Any], items: dict[Any, Any]) -> dict[Any, Any]:
    """``items`` in a dict of ``original``'s type (a GradScaler keeps its per-optimizer defaultdict)."""
    if isinstance(original, defaultdict):
        return defaultdict(original.default_factory, items)
    return items if type(original) is dict else type(original)(items)


def _device(saved: Any) -> Any:
    """The inverse of :func:`_host`: tensors back on the device they came from, as fresh copies."""
    if isinstance(saved, _Saved):
        return saved.data.to(saved.device, copy=True)
    if isinstance(saved, dict):
        return _rebuilt(saved, {k: _device(v) for k, v in saved.items()})
    if isinstance(saved, (list, tuple)):
        return type(saved)(_device(v) for v in saved)
    return copy.deepcopy(saved)


@dataclass(frozen=True)
class _Saved:
    """A host copy of a tensor and the device it came from."""

    data: torch.Tensor
    device: torch.device


@dataclass
class Snapshot:
    """What :func:`snapshot` took; :meth:`restore` writes it back."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None
    tensors: list[tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]]
    slots: list[tuple[nn.Module, str, dict[str, Any]]]
    modes: list[tuple[nn.Module, bool]]
    optimizer_state: dict[str, Any] | None
    scaler_state: dict[str, Any]
    rng: dict[str, Any]

    def restore(self) -> None:
        """Put everything back as it was when the snapshot was taken."""
        for module, kind, entries in self.slots:
            table = getattr(module, kind)
            for name in [n for n in table if n not in entries]:
                del table[name]  # registered after the snapshot
            for name, tensor in entries.items():
                if table.get(name) is not tensor:
                    table[name] = tensor  # reassigned after the snapshot
        with torch.no_grad():
            for tensor, data, requires_grad, grad in self.tensors:
                tensor.copy_(data)
                if tensor.is_leaf:
                    tensor.requires_grad_(requires_grad)
                    tensor.grad = None if grad is None else grad.to(tensor.device)
        for module, training in self.modes:
            module.training = training
        if self.optimizer is not None and self.optimizer_state is not None:
            _restore_optimizer(self.optimizer, _device(self.optimizer_state))
        if self.scaler is not None:
            for key, value in self.scaler_state.items():
                setattr(self.scaler, key, _device(value))
        restore_rng(self.rng)


def _restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    groups = optimizer.param_groups
    originals = list(groups)
    optimizer.load_state_dict(state)
    # load_state_dict builds new group dicts; the user (or a scheduler) may hold the old ones.
    for original, loaded in zip(originals, optimizer.param_groups, strict=True):
        params = original["params"]
        original.clear()
        original.update(loaded)
        original["params"] = params
    optimizer.param_groups[:] = originals


def rng_state() -> dict[str, Any]:
    """The states of the global generators (torch CPU and CUDA, Python, NumPy)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with scikit-learn
        pass
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put the global generators back to ``state`` (from :func:`rng_state`)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave the global random generators as they were, whatever the block draws.

    Reading samples to check them must not consume the RNG of a dataset that augments at random.

    Example:
        >>> before = torch.get_rng_state()
        >>> with preserved_rng():
        ...     _ = torch.rand(10)
        >>> torch.equal(torch.get_rng_state(), before)
        True
    """
    saved = rng_state()
    try:
        yield
    finally:
        restore_rng(saved)


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
    slots: list[tuple[nn.Module, str, dict[str, Any]]] = []
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            entries = dict(getattr(module, kind))
            slots.append((module, kind, entries))
            for t in entries.values():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                grad = t.grad.detach().to("cpu", copy=True) if t.grad is not None else None
                tensors.append((t, t.detach().to("cpu", copy=True), t.requires_grad, grad))
    scaler_state: dict[str, Any] = {}
    if scaler is not None:
        scaler_state = {k: _host(v) for k, v in vars(scaler).items()}
    return Snapshot(
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        tensors=tensors,
        slots=slots,
        modes=[(m, m.training) for m in model.modules()],
        optimizer_state=_host(optimizer.state_dict()) if optimizer is not None else None,
        scaler_state=scaler_state,
        rng=rng_state(),
    )
