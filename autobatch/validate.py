"""Argument checks shared by the public entry points; each error names the argument, the expected value
and the value received."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "check_model_and_optimizer",
    "check_positive_int",
    "default_device",
    "parse_device",
    "resolve_device",
]


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an int ≥ 1 (bools are refused), else raise TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"Expected `{name}` to be a positive int, but got {value!r} ({type(value).__name__})."
        )
    if value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, but got {value}.")
    return value


def default_device() -> torch.device:
    """CUDA when available, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device``; a bare ``"cuda"`` becomes the current CUDA device.

    Raises:
        TypeError: ``device`` is not a str or ``torch.device``.
        ValueError: it does not name a device.
    """
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"Expected `device` to be a str or torch.device, but got {device!r} ({type(device).__name__})."
        )
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"Expected `device` to be a device such as 'cuda' or 'cpu', but got {device!r}."
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device` is {device!r} but CUDA is not available here; use 'cpu'.")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return None


def resolve_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    """The device to probe on: ``device`` if given (the model must already be there), else the model's.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``device`` is not a device.
        ValueError: ``device`` does not parse, or the model lives elsewhere.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    here = _model_device(model)
    if device is None:
        return here if here is not None else torch.device("cpu")
    dev = parse_device(device)
    if here is not None and (here.type, here.index or 0) != (dev.type, dev.index or 0):
        raise ValueError(
            f"The model lives on {here} but `device` is {dev}: move it first with model.to({str(dev)!r}) "
            "(before creating its optimizer), or leave `device` unset."
        )
    return dev


def check_model_and_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> torch.optim.Optimizer:
    """Check that the model can train and that ``optimizer`` holds its parameters.

    Returns:
        ``optimizer``, or a new AdamW (lr 1e-3) over the trainable parameters when it is ``None``.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"Expected `model` to have trainable parameters, but {type(model).__name__} has none "
            "(all parameters have requires_grad=False, or it has no parameters)."
        )
    if optimizer is None:
        return torch.optim.AdamW(trainable, lr=1e-3)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Expected `optimizer` to be a torch.optim.Optimizer, but got {type(optimizer).__name__}."
        )
    owned = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in owned for p in held)
    if foreign or not any(p.requires_grad for p in held):
        raise ValueError(
            "Expected `optimizer` to hold the model's trainable parameters, but "
            + (f"{foreign} of its {len(held)} parameters are not the model's" if foreign else "it holds none")
            + ". Create it from this model: torch.optim.AdamW(model.parameters())."
        )
    return optimizer
