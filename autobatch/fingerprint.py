"""What the probe cache's key is made of: a JSON-safe fingerprint of everything a probe's answer depends on.

:func:`fingerprint` describes the setup (model structure, optimizer, precision, device, memory limit, world
size, sample shapes, dataset size, options, torch and autobatch versions);
:func:`autobatch.cache.cache_key` hashes it. Any change gives a new key, so the cache probes again.

Example:
    >>> import torch
    >>> from autobatch.cache import cache_key
    >>> fp = fingerprint(model=torch.nn.Linear(8, 2), optimizer=None, precision="fp32", device=torch.device(
    ...     "cpu"), memory_limit=None, world_size=1, sample=torch.randn(4, 8), dataset_size=64)
    >>> fp["sample"], len(cache_key(fp))
    ({'tensor': [4, 8], 'dtype': 'torch.float32'}, 64)
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from autobatch._version import __version__
from autobatch.cache import CACHE_FORMAT
from autobatch.codehash import code_digest, is_library

__all__ = ["fingerprint", "json_safe"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _qualname(obj: Any) -> str:
    """``module.qualname`` of a function or class; of its type for other callables (partials, instances)."""
    if not hasattr(obj, "__qualname__"):
        obj = type(obj)
    return f"{getattr(obj, '__module__', None) or '?'}.{obj.__qualname__}"


def json_safe(value: Any) -> Any:
    """``value`` with only JSON types, stable across runs: callables by their code, the rest by repr."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if callable(value):
        return {"callable": _qualname(value), "code": code_digest(value)}
    return _ADDRESS.sub("", repr(value))  # an object's address changes every run


def _shapes(sample: Any) -> Any:
    """The shapes and dtypes of every tensor in ``sample``, walking tuples, lists and dicts."""
    if isinstance(sample, torch.Tensor):
        return {"tensor": list(sample.shape), "dtype": str(sample.dtype)}
    if isinstance(sample, Mapping):
        return {"mapping": {str(k): _shapes(v) for k, v in sample.items()}}
    if isinstance(sample, (list, tuple)):
        return {"sequence": [_shapes(v) for v in sample]}
    if hasattr(sample, "shape") and hasattr(sample, "dtype"):  # NumPy and friends
        return {"array": [int(n) for n in sample.shape], "dtype": str(sample.dtype)}
    return {"type": _qualname(type(sample))}  # not the value: ids or paths vary from sample to sample


def _device_info(device: torch.device) -> dict[str, Any]:
    """The device's kind, name and total memory (``None`` where it cannot be read)."""
    name, total = device.type, None
    try:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            name, total = props.name, int(props.total_memory)
        elif device.type == "cpu":
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        elif device.type == "mps":
            total = int(torch.mps.recommended_max_memory())
    except (AttributeError, AssertionError, OSError, RuntimeError, ValueError):
        pass
    return {"type": device.type, "name": name, "total_memory": total}


def fingerprint(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    precision: str,
    device: torch.device,
    memory_limit: int | None,
    world_size: int,
    sample: Any,
    dataset_size: int,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-safe description of everything a probe's answer depends on; hash it with :func:`cache_key`.

    Weights and the learning rate are left out (they do not change the memory a step takes).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``optimizer`` not an optimizer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Expected `optimizer` to be a torch.optim.Optimizer or None, but got {type(optimizer).__name__}."
        )
    return {
        "format": CACHE_FORMAT,
        "autobatch": __version__,
        "torch": str(torch.__version__),
        "python": sys.version.split()[0],  # bytecode differs between Python versions
        "model": {
            "modules": [[name, _qualname(type(m))] for name, m in model.named_modules()],
            "parameters": [
                [name, list(p.shape), str(p.dtype), p.requires_grad] for name, p in model.named_parameters()
            ],
            "buffers": [[name, list(b.shape), str(b.dtype)] for name, b in model.named_buffers()],
            "attributes": _plain_attributes(model),
            "code": code_digest(*sorted({type(m) for m in model.modules()}, key=_qualname)),
        },
        "optimizer": _optimizer(model, optimizer) if optimizer is not None else None,
        "precision": str(precision),
        "device": _device_info(torch.device(device)),
        "memory_limit": memory_limit,
        "world_size": world_size,
        "sample": _shapes(sample),
        "dataset_size": dataset_size,
        "options": json_safe(dict(options or {})),
    }


_PLAIN = (bool, int, float, str, type(None))
_NOT_STATE = frozenset({"training"})


def _plain_attributes(model: nn.Module) -> list[list[Any]]:
    """Every module's plain public attributes (a copy count, a flag): they steer what forward does."""
    found = []
    for name, module in model.named_modules():
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key in _NOT_STATE:
                continue
            plain = isinstance(value, _PLAIN) or (
                isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)
            )
            if plain:
                found.append([name, key, json_safe(value)])
    return found


def _optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's type (its code, when it is the user's), settings, and which parameters it holds."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
        held = [names.get(id(p), f"<{list(p.shape)}>") for p in group["params"]]
        groups.append({"params": held, "settings": json_safe(dict(sorted(settings.items())))})
    kind = type(optimizer)
    code = None if is_library(kind.__module__) else code_digest(kind)
    return {"type": _qualname(kind), "code": code, "groups": groups}
