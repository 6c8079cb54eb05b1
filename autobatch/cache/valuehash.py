"""A stable, bounded digest of the values a training step reads: what a closure captured, what a global, a
module or a dataset holds.

Values are hashed by what they are, never by where they live: plain values by their repr; containers by
their items (dicts and sets in the order of their items' digests, so that hash seeds and insertion orders do
not matter); tensors and arrays by shape and dtype, never their data; an object by its class and
attributes (read from ``__dict__``, so no property or ``__getattr__`` of the user's runs); a module as
:mod:`autobatch.cache.modulehash` says. Objects of the standard library (a logger, a lock) count
by their type only: their state is the process's, not the step's.

Every walk ends: each object is hashed once (a shared one again by its digest, one that contains itself
by a marker), and a depth and a size budget bound it; past a budget, what was seen is hashed with a marker
and the cut is logged at debug level. Code (functions, classes, and what code reads) is
:mod:`autobatch.cache.codehash`'s, datasets :mod:`autobatch.cache.datahash`'s: both build on this walk.
"""

from __future__ import annotations

import argparse
import enum
import functools
import hashlib
import logging
import sys
import types
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "CODE",
    "CONTAINERS",
    "DESCRIPTORS",
    "MAX_DEPTH",
    "MAX_NODES",
    "NAMESPACES",
    "PLAIN",
    "TORCH_NAMES",
    "ValueWalk",
    "attributes",
    "is_array",
    "is_instance",
    "is_library",
    "is_stdlib",
    "items_of",
    "qualname",
    "sorted_items",
    "tensor_parts",
]

logger = logging.getLogger(__name__)

MAX_DEPTH = 48
"""Nested objects followed at most (each a few interpreter frames: far below the recursion limit)."""
MAX_NODES = 100_000
"""Values hashed per digest at most: a bound on what one key may cost."""

_LIBRARIES = frozenset({"torch", "torchvision", "torchaudio", "numpy", "builtins", "_operator"})
PLAIN = (type(None), bool, int, float, complex, str, bytes)
NAMESPACES = (types.SimpleNamespace, argparse.Namespace)  # the standard library's config holders
CONTAINERS = (dict, list, tuple, set, frozenset, deque)
CODE = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)
DESCRIPTORS = (staticmethod, classmethod, property, functools.cached_property, functools.partialmethod)
TORCH_NAMES = (torch.device, torch.dtype, torch.layout, torch.memory_format)


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


def sorted_items(found: dict[Any, Any]) -> list[tuple[Any, Any]]:
    return sorted(found.items(), key=lambda item: str(item[0]))


class ValueWalk:
    """One bounded walk, fed into one SHA-256; :meth:`add` (code) is
    :class:`~autobatch.cache.codehash.Digest`'s."""

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
        self.report()
        return self.hash.hexdigest()

    def report(self) -> None:
        """Log, at debug level, where the walk was cut (what was seen is hashed, with a marker)."""
        if self.cuts:
            logger.debug("the cache key's walk was cut (%s): what was seen is hashed", dict(self.cuts))

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

    def sub(self, value: Any, walk: Callable[[Any], object] | None = None) -> bytes:
        """The digest of ``value`` alone (to sort the items of dicts and sets by)."""
        outer, self.hash = self.hash, hashlib.sha256()
        try:
            (walk or self.value)(value)
            return self.hash.digest()
        finally:
            self.hash = outer

    def part(self, value: Any, walk: Callable[[Any], object] | None = None, budget: int = MAX_NODES) -> str:
        """The hex digest of one part of a key, under a size budget of its own: a large model cannot use up
        what its loss function gets. What earlier parts hashed is reused, not hashed again."""
        self.nodes, self.max_nodes = 0, budget
        return self.sub(value, walk).hex()

    def value(self, value: Any) -> None:
        """Hash a value: plain ones by repr, everything else by what it holds."""
        if type(value) in PLAIN:
            self.text(type(value).__name__, repr(value))
        elif is_instance(value, TORCH_NAMES):
            self.text(type(value).__name__, value)
        elif is_instance(value, torch.Tensor):  # a leaf: never its data
            self.tensor(value)
        elif is_instance(value, CODE):
            self.add(value)
        else:
            self.node(value, self._describe)

    def _describe(self, value: Any) -> None:
        if is_instance(value, enum.Enum):
            self.add(type(value))
            self.text("enum", attributes(value).get("_name_"))
        elif is_instance(value, PLAIN):  # a subclass of int or str: by the built-in's repr, not its own
            base: Any = next(b for b in PLAIN if is_instance(value, b))
            self.text(qualname(value), base.__repr__(value))
        elif is_instance(value, CONTAINERS):
            self.container(value, self.value)
        elif is_array(value):
            shape = tuple(value.shape)
            if shape == () and hasattr(type(value), "item"):  # a NumPy scalar (np.float32(0.5)): a setting
                self.text("scalar", qualname(value), value.item())
            else:  # an array: its data is never read
                self.text("array", qualname(value), shape, value.dtype)
        elif type(value) in (range, slice, bytearray):
            self.text(qualname(value), repr(value))
        elif is_stdlib(value) and not is_instance(value, NAMESPACES):
            self.text("object", qualname(value))  # the process's state, not the step's (a logger, a lock)
        else:
            self.add(type(value))  # the class's code, then its state
            for name, attribute in sorted_items(attributes(value)):
                self.text("attribute", name)
                self.value(attribute)

    def container(self, value: Any, item: Callable[[Any], None]) -> None:
        """Items in order; a dict's and a set's in the order of their digests. Each item counts towards the
        size budget: past it, a sequence is hashed up to there, a dict or a set by its length only (which
        of its items come first depends on the hash seed). Read through the built-in type: a subclass's own
        ``items()`` or ``__iter__`` (a lazy mapping that imports, a list that raises) never runs."""
        items = items_of(value)
        self.text(qualname(value), len(items))
        room = max(self.max_nodes - self.nodes, 0)
        self.nodes += min(len(items), room)
        if len(items) > room:
            self.cuts["size"] += 1
            self.text("cut", "size", room)
            if not is_instance(value, (list, tuple, deque)):
                return
            items = items[:room]
        if is_instance(value, dict):
            pairs = sorted((self.sub(k, item), self.sub(v, item)) for k, v in items)
            for digest in (part for pair in pairs for part in pair):
                self.hash.update(digest)
        elif is_instance(value, (set, frozenset)):
            for digest in sorted(self.sub(v, item) for v in items):
                self.hash.update(digest)
        else:
            for v in items:
                item(v)

    def tensor(self, value: torch.Tensor) -> None:
        self.text(*tensor_parts(value))


def tensor_parts(value: torch.Tensor) -> tuple[object, ...]:
    """What a tensor counts by: its class, shape, dtype, ``requires_grad`` and device type, never its data."""
    try:
        shape: object = tuple(value.shape)
    except RuntimeError:  # a nested or otherwise shapeless tensor
        shape = "?"
    return ("tensor", qualname(value), shape, value.dtype, value.requires_grad, value.device.type)


def items_of(value: Any) -> list[Any]:
    """A container's items (a dict's pairs) as its built-in type holds them."""
    base = next(b for b in CONTAINERS if is_instance(value, b))
    return list(dict.items(value)) if base is dict else list(base.__iter__(value))


def is_array(value: Any) -> bool:
    """NumPy arrays and friends: a shape and a dtype on the class (not an instance's ``__getattr__``)."""
    cls = type(value)
    return hasattr(cls, "shape") and hasattr(cls, "dtype") and not is_instance(value, type)


def is_stdlib(value: Any) -> bool:
    """Whether ``value``'s class is the standard library's (or a built-in)."""
    top = (type(value).__module__ or "builtins").split(".")[0]
    return top in sys.stdlib_module_names or top == "builtins"
