"""A stable, bounded digest of the values a training step reads: what a closure captured, what a global, a
module or a dataset holds.

Values are hashed by what they are, never by where they live: plain values by their repr; containers by
their items (dicts and sets in the order of their items' digests, so that hash seeds and insertion orders do
not matter); tensors and arrays by shape and dtype, never their data; a module by its submodules, their
parameters, buffers, attributes and hooks (hook dicts by their hooks in order, never by their handle ids,
which count up through a process); an object by its class and attributes (read from ``__dict__``, so no
property or ``__getattr__`` of the user's runs). Objects of the standard library (a logger, a lock) count
by their type only: their state is the process's, not the step's.

Every walk ends: each object is hashed once (a shared one again by its digest, one that contains itself
by a marker), and a depth and a size budget bound it; past a budget, what was seen is hashed with a marker
and the cut is logged at debug level. Code (functions, classes) is :mod:`autobatch.codehash`'s, which
builds on this walk.
"""

from __future__ import annotations

import argparse
import enum
import functools
import hashlib
import itertools
import logging
import sys
import types
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["MAX_DEPTH", "MAX_NODES", "ValueWalk", "is_instance", "is_library", "qualname"]

logger = logging.getLogger(__name__)

MAX_DEPTH = 48
"""Nested objects followed at most (each a few interpreter frames: far below the recursion limit)."""
MAX_NODES = 100_000
"""Values hashed per digest at most: a bound on what one key may cost."""
DATA_ITEMS = 64
"""A dataset's container with more items than this is its data: hashed by type and length only."""

_LIBRARIES = frozenset({"torch", "torchvision", "torchaudio", "numpy", "builtins", "_operator"})
_PLAIN = (type(None), bool, int, float, complex, str, bytes)
_NAMESPACES = (types.SimpleNamespace, argparse.Namespace)  # the standard library's config holders
_CODE = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)
_TORCH_NAMES = (torch.device, torch.dtype, torch.layout, torch.memory_format)
# What torch keeps on every module for itself: the walk reads these its own way, or not at all (state-dict
# hooks never run in a step).
_MODULE_INTERNALS = frozenset(
    {
        "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
        "_compiled_call_impl", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    }
)  # fmt: skip
_HOOK_FLAGS = ("_with_kwargs", "_always_called")  # {handle id: True} beside the hook dict they qualify


def is_library(module: str | None) -> bool:
    """Whether code from ``module`` counts by name only (standard library, torch, NumPy)."""
    top = (module or "builtins").split(".")[0]
    return top in _LIBRARIES or top in sys.stdlib_module_names


def qualname(obj: Any) -> str:
    """``module.qualname`` of a function or class; of its type for anything else (read from the type:
    never an instance's own ``__getattr__``)."""
    if not is_instance(obj, (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        obj = type(obj)
    return f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', '?')}"


def is_instance(value: Any, classes: type | tuple[type, ...]) -> bool:
    """``isinstance`` by the type alone: ``isinstance`` would read the ``__class__`` of user objects."""
    return issubclass(type(value), classes)


def attributes(obj: Any) -> dict[str, Any]:
    """An object's instance attributes, read past any ``__getattribute__`` or property of its class."""
    try:
        found = dict(object.__getattribute__(obj, "__dict__"))
    except (AttributeError, TypeError):
        found = {}
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and name not in found:
                try:
                    found[name] = object.__getattribute__(obj, name)
                except (AttributeError, TypeError):  # an unset slot
                    continue
    return found


def _sorted_items(found: dict[Any, Any]) -> list[tuple[Any, Any]]:
    return sorted(found.items(), key=lambda item: str(item[0]))


class ValueWalk:
    """One bounded walk, fed into one SHA-256; :meth:`add` (code) is :class:`~autobatch.codehash.Digest`'s."""

    def __init__(self, max_nodes: int = MAX_NODES) -> None:
        self.hash = hashlib.sha256()
        self.max_nodes = max_nodes
        self.nodes = 0
        self.depth = 0
        self.done: dict[tuple[int, str], tuple[Any, bytes]] = {}  # holds the object: its id stays unique
        self.open: set[tuple[int, str]] = set()
        self.cuts: Counter[str] = Counter()

    def text(self, *parts: object) -> None:
        self.hash.update("".join(f"{part}\0" for part in parts).encode("utf-8", "surrogatepass"))

    def add(self, obj: Any) -> None:  # pragma: no cover - Digest overrides it
        raise NotImplementedError

    def hexdigest(self) -> str:
        if self.cuts:
            logger.debug("the cache key's walk was cut (%s): what was seen is hashed", dict(self.cuts))
        return self.hash.hexdigest()

    def node(self, obj: Any, describe: Callable[[Any], None], mode: str = "value") -> None:
        """Hash ``obj`` by ``describe``, once: again by its digest, inside itself by a marker."""
        key = (id(obj), mode)
        if key in self.done:
            self.hash.update(self.done[key][1])
            return
        if key in self.open:
            self.text("cycle", qualname(obj))
            return
        if self.depth >= MAX_DEPTH or self.nodes >= self.max_nodes:
            why = "depth" if self.depth >= MAX_DEPTH else "size"
            self.cuts[why] += 1
            self.text("cut", why, qualname(obj))
            return
        self.nodes += 1
        outer, self.hash = self.hash, hashlib.sha256()
        self.open.add(key)
        self.depth += 1
        try:
            describe(obj)
            digest = self.hash.digest()
        finally:
            self.hash = outer
            self.open.discard(key)
            self.depth -= 1
        self.done[key] = (obj, digest)
        outer.update(digest)

    def sub(self, value: Any, walk: Callable[[Any], None] | None = None) -> bytes:
        """The digest of ``value`` alone (to sort the items of dicts and sets by)."""
        outer, self.hash = self.hash, hashlib.sha256()
        try:
            (walk or self.value)(value)
            return self.hash.digest()
        finally:
            self.hash = outer

    def value(self, value: Any) -> None:
        """Hash a value: plain ones by repr, everything else by what it holds."""
        if type(value) in _PLAIN:
            self.text(type(value).__name__, repr(value))
        elif is_instance(value, _TORCH_NAMES):
            self.text(type(value).__name__, value)
        elif is_instance(value, torch.Tensor):  # a leaf: never its data
            self.tensor(value)
        elif is_instance(value, _CODE):
            self.add(value)
        else:
            self.node(value, self._describe)

    def _describe(self, value: Any) -> None:
        if is_instance(value, enum.Enum):
            self.add(type(value))
            self.text("enum", value.name)
        elif is_instance(value, _PLAIN):  # a subclass of int or str
            self.text(qualname(value), repr(value))
        elif is_instance(value, nn.Module):
            self.module(value)
        elif is_instance(value, (list, tuple, deque, dict, set, frozenset)):
            self.container(value, self.value)
        elif _is_array(value):
            self.text("array", qualname(value), tuple(value.shape), value.dtype)
        elif is_instance(value, (range, slice, bytearray)):
            self.text(qualname(value), repr(value))
        elif _is_stdlib(value) and not is_instance(value, _NAMESPACES):
            self.text("object", qualname(value))  # the process's state, not the step's (a logger, a lock)
        else:
            self.add(type(value))  # the class's code, then its state
            for name, attribute in _sorted_items(attributes(value)):
                self.text("attribute", name)
                self.value(attribute)

    def container(self, value: Any, item: Callable[[Any], None]) -> None:
        """Items in order; a dict's and a set's in the order of their digests. Each item counts towards the
        size budget: past it, a sequence is hashed up to there, a dict or a set by its length only (which
        of its items come first depends on the hash seed)."""
        self.text(qualname(value), len(value))
        room = self.max_nodes - self.nodes
        self.nodes += min(len(value), max(room, 0))
        if len(value) > room:
            self.cuts["size"] += 1
            self.text("cut", "size", max(room, 0))
            if is_instance(value, (dict, set, frozenset)):
                return
            value = itertools.islice(value, max(room, 0))
        if is_instance(value, dict):
            pairs = sorted((self.sub(k, item), self.sub(v, item)) for k, v in value.items())
            for digest in (part for pair in pairs for part in pair):
                self.hash.update(digest)
        elif is_instance(value, (set, frozenset)):
            for digest in sorted(self.sub(v, item) for v in value):
                self.hash.update(digest)
        else:
            for v in value:
                item(v)

    def tensor(self, value: torch.Tensor) -> None:
        try:
            shape: object = tuple(value.shape)
        except RuntimeError:  # a nested or otherwise shapeless tensor
            shape = "?"
        self.text("tensor", qualname(value), shape, value.dtype, value.requires_grad, value.device.type)

    def module(self, model: nn.Module) -> None:
        """Every submodule: its name, class (by its code), parameters, buffers, attributes and hooks."""
        for name, module in model.named_modules():
            own = attributes(module)
            children = own.get("_modules") or {}
            self.text("module", name, len(children), *children)
            self.add(type(module))
            for kind in ("_parameters", "_buffers"):
                for key, tensor in (own.get(kind) or {}).items():
                    self.text(kind, key)
                    self.value(tensor)
            transient = own.get("_non_persistent_buffers_set")
            if transient:
                self.text("transient", *sorted(transient))
            for key, attribute in _sorted_items(own):
                if key in _MODULE_INTERNALS or (_is_hooks(key, attribute) and not attribute):
                    continue  # torch's own (read above), or no hooks
                self.text("attribute", key)
                if _is_hooks(key, attribute):
                    self.hooks(own, key, attribute)
                else:
                    self.value(attribute)

    def hooks(self, own: dict[str, Any], key: str, hooks: dict[Any, Any]) -> None:
        """A hook dict by its hooks in order; a flag dict by the places of the hooks it flags."""
        for suffix in _HOOK_FLAGS:
            if key.endswith(suffix):
                order = list(own.get(key[: -len(suffix)]) or {})
                self.text("flags", *(order.index(h) if h in order else "?" for h in hooks))
                return
        self.text("hooks", len(hooks))
        for hook in hooks.values():
            self.value(hook)

    def data(self, value: Any) -> None:
        """Hash what a dataset holds that steers a sample, never its data: the type, plain attributes,
        callables (a ``transform=``) and nested datasets; a large container by its type and length."""
        if is_instance(value, (*_PLAIN, *_TORCH_NAMES, torch.Tensor, nn.Module, *_CODE)) or _is_array(value):
            self.value(value)
        elif is_instance(value, (list, tuple, deque, dict, set, frozenset)):
            if len(value) > DATA_ITEMS:
                self.text("data", qualname(value), len(value))
            else:
                self.node(value, lambda v: self.container(v, self.data), "data")
        elif _is_stdlib(value) or (is_library(type(value).__module__) and not callable(value)):
            self.text("object", qualname(value))  # a table or a frame of the data: never read
        else:  # a dataset, a transform object, a user object: its class and what it holds, by these rules
            self.node(value, self._dataset, "data")

    def _dataset(self, value: Any) -> None:
        self.add(type(value))
        for name, attribute in _sorted_items(attributes(value)):
            self.text("attribute", name)
            self.data(attribute)


def _is_hooks(key: str, value: Any) -> bool:
    """One of torch's hook dicts on a module (``_forward_hooks``, ``_backward_pre_hooks``…)."""
    return key.startswith("_") and "hooks" in key and is_instance(value, dict)


def _is_array(value: Any) -> bool:
    """NumPy arrays and friends: a shape and a dtype on the class (not an instance's ``__getattr__``)."""
    cls = type(value)
    return hasattr(cls, "shape") and hasattr(cls, "dtype") and not is_instance(value, type)


def _is_stdlib(value: Any) -> bool:
    top = (type(value).__module__ or "builtins").split(".")[0]
    return top in sys.stdlib_module_names or top == "builtins"
