"""What the probe cache's key is made of: a JSON-safe fingerprint of everything a probe's answer depends on.

:func:`fingerprint` describes the setup: the model (its submodules, their code, parameters, buffers,
attributes and hooks), the optimizer, precision, device, memory limit, world size, sample shapes, the dataset
(its code, settings and transforms, never its samples) and collate function, the torch settings that steer
which kernels run (:mod:`autobatch.cache.torchsettings`), the options, and the torch and autobatch versions;
:func:`autobatch.cache.store.cache_key` hashes it. Any change gives a new key, so the cache probes again. The
parts that grow with the model are stored as digests (:mod:`autobatch.cache.codehash`): an entry stays a few
KiB whatever the model's size, and names what ``autobatch cache show`` lists (the model's class, its size).

Example:
    >>> import torch
    >>> from autobatch.cache.store import cache_key
    >>> fp = fingerprint(model=torch.nn.Linear(8, 2), optimizer=None, precision="fp32", device=torch.device(
    ...     "cpu"), memory_limit=None, world_size=1, sample=torch.randn(4, 8), dataset_size=64)
    >>> fp["sample"], fp["model"]["class"], len(cache_key(fp))
    ({'tensor': [4, 8], 'dtype': 'torch.float32'}, 'torch.nn.modules.linear.Linear', 64)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from autobatch._version import __version__
from autobatch.cache.codehash import Digest
from autobatch.cache.datahash import DataDigest
from autobatch.cache.store import CACHE_FORMAT
from autobatch.cache.torchsettings import torch_settings
from autobatch.cache.valuehash import MAX_NODES, qualname

__all__ = ["fingerprint", "json_safe", "with_model"]

_NODES_PER_MODULE = 64
"""What the walk of a model may spend per module, past :data:`~autobatch.cache.valuehash.MAX_NODES`."""
_SAMPLE_CHARS = 512
"""A sample's shapes longer than this as JSON are stored as their digest: an entry stays small."""


def json_safe(value: Any, walk: Digest | None = None) -> Any:
    """``value`` with only JSON types, stable across runs: plain values as they are, callables by their
    code, anything else by the digest of what it holds (never its repr, which may hold an address).

    Types are read from ``type()``: no property or ``__getattr__`` of a user's object runs. ``walk``: the
    walk to share (what it already hashed is not hashed again).
    """
    walk = walk or Digest()
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if math.isfinite(value) else repr(value)
    if kind is dict:
        return {str(k): json_safe(v, walk) for k, v in value.items()}
    if kind in (list, tuple):
        return [json_safe(v, walk) for v in value]
    if kind in (torch.device, torch.dtype):
        return str(value)
    if callable(value):
        return {"callable": qualname(value), "code": walk.part(value, walk.add)}
    return {"object": qualname(value), "digest": walk.part(value)}


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
    return {"type": qualname(type(sample))}  # not the value: ids or paths vary from sample to sample


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
    dataset: Any = None,
    collate_fn: Any = None,
) -> dict[str, Any]:
    """A JSON-safe description of everything a probe's answer depends on; hash it with :func:`cache_key`.

    Weights, the learning rate and the samples' values are left out (they do not change the memory a step
    takes).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``optimizer`` not an optimizer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Expected `optimizer` to be a torch.optim.Optimizer or None, but got {type(optimizer).__name__}."
        )
    walk = DataDigest()  # one walk for every part: code they share (a library's) is hashed once
    fp = {
        "format": CACHE_FORMAT,
        "autobatch": __version__,
        "torch": str(torch.__version__),
        "python": sys.version.split()[0],  # bytecode differs between Python versions
        "model": _model(model, walk),
        "optimizer": _optimizer(model, optimizer, walk) if optimizer is not None else None,
        "precision": str(precision),
        "device": _device_info(torch.device(device)),
        "memory_limit": memory_limit,
        "world_size": world_size,
        "sample": _sample(sample),
        "dataset_size": dataset_size,
        "data": _data(dataset, collate_fn, walk),
        "settings": torch_settings(),
        "options": json_safe(dict(options or {}), walk),
    }
    walk.report()
    return fp


def with_model(fp: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """``fp`` with the model's part taken again: a forward may set a module's attributes on its first call
    (Hugging Face's ``config.problem_type``, a cache a layer builds lazily)."""
    walk = DataDigest()
    found = {**fp, "model": _model(model, walk)}
    walk.report()
    return found


def _model(model: nn.Module, walk: Digest) -> dict[str, Any]:
    """The model's class and size, to read, and the digest of all it is: submodules, code, state, hooks."""
    modules = sum(1 for _ in model.modules())
    return {
        "class": qualname(type(model)),
        "modules": modules,
        "parameters": sum(p.numel() for p in model.parameters()),
        # The budget grows with the model: every module's attributes (a kernel size, a stride) count.
        "digest": walk.part(model, budget=MAX_NODES + _NODES_PER_MODULE * modules),
    }


def _sample(sample: Any) -> Any:
    shapes = _shapes(sample)
    text = json.dumps(shapes, sort_keys=True, separators=(",", ":"))
    return shapes if len(text) <= _SAMPLE_CHARS else {"digest": hashlib.sha256(text.encode()).hexdigest()}


def _data(dataset: Any, collate_fn: Any, walk: DataDigest) -> dict[str, Any] | None:
    """The dataset's and the collate function's names, and the digest of their code, settings and
    transforms (never of the samples: a dataset may hold gigabytes)."""
    if dataset is None and collate_fn is None:
        return None

    def both(pair: tuple[Any, Any]) -> None:
        for value in pair:
            walk.data(value)

    return {
        "dataset": qualname(type(dataset)),
        "collate_fn": qualname(collate_fn) if collate_fn is not None else None,
        "digest": walk.part((dataset, collate_fn), both),
    }


def _optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, walk: Digest) -> dict[str, Any]:
    """The optimizer's type, and a digest of its code (when it is the user's), settings, hooks and which
    parameters it holds."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [
        (
            [names.get(id(p), f"<{list(p.shape)}>") for p in group["params"]],
            {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")},
        )
        for group in optimizer.param_groups
    ]
    hooks = [
        list((getattr(optimizer, name, None) or {}).values())
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
    ]
    return {"type": qualname(type(optimizer)), "digest": walk.part([type(optimizer), groups, hooks])}
