"""A digest of the code a training step runs: it changes whenever that code does.

The probe cache must not serve an answer measured for other code. A step's memory depends on the code of
the model's own module classes (an edited ``forward``), the helpers that code calls, and the loss, step and
size functions — lambdas included, which all share the name ``<lambda>``. :func:`code_digest` hashes what
Python runs, not names or source files: each function's bytecode, its constants (nested functions too),
the names it uses, its defaults and the values its closure captured, and, recursively, what it reaches
through its globals: the functions and classes (a helper in the user's module, a method of a user class)
and the values (a module-level constant such as ``COPIES = 4``) its code names. A bound method counts
with its instance, a callable object with its class and state (:mod:`autobatch.cache.valuehash`). Classes
defined in a notebook or with ``python -c`` have no source file but do have bytecode, so they are hashed
like any other. Code from the standard library, torch and NumPy counts by name only: it changes with
their versions, which the key holds.

Example:
    >>> def make(k):
    ...     return lambda x: x * k
    >>> code_digest(make(2)) == code_digest(make(2)), code_digest(make(2)) == code_digest(make(3))
    (True, False)
"""

from __future__ import annotations

import dataclasses
import dis
import enum
import functools
import sys
import types
from typing import Any

import torch

from autobatch.cache.modulehash import ModuleWalk
from autobatch.cache.valuehash import (
    CODE,
    CONTAINERS,
    DESCRIPTORS,
    NAMESPACES,
    PLAIN,
    TORCH_NAMES,
    attributes,
    is_array,
    is_instance,
    is_library,
    qualname,
    sorted_items,
)

__all__ = ["Digest", "code_digest", "is_library", "value_digest"]

_CLASS_SKIP = frozenset({"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__"})


class Digest(ModuleWalk):
    """A bounded walk over code and the values it reaches, into one SHA-256."""

    def add(self, obj: Any) -> None:
        """Hash a function, class, method, partial or callable object (and what it reaches)."""
        if is_instance(obj, type):
            if is_library(obj.__module__):
                self.text("library class", obj.__module__, obj.__qualname__)
            else:
                self.node(obj, self.cls, "code")
        elif is_instance(obj, types.FunctionType):
            if is_library(obj.__module__):
                self.text("library", obj.__module__, obj.__qualname__)
            else:
                self.node(obj, self.function, "code")
        elif is_instance(obj, (types.MethodType, functools.partial, *DESCRIPTORS)):
            self.node(obj, self.wrapper, "code")
        elif is_instance(obj, types.BuiltinFunctionType):  # C code: by name, with the object it is bound to
            self.text("builtin", getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
            owner = getattr(obj, "__self__", None)
            if owner is not None and not is_instance(owner, types.ModuleType):
                self.value(owner)
        else:
            self.value(obj)

    def wrapper(self, obj: Any) -> None:
        """What a method, partial or descriptor wraps (a bound method with its instance: its state counts)."""
        self.text(type(obj).__name__)
        if is_instance(obj, types.MethodType):
            self.add(obj.__func__)
            self.value(obj.__self__)
        elif is_instance(obj, (functools.partial, functools.partialmethod)):
            self.add(obj.func)
            self.value(obj.args)
            self.value(obj.keywords)
        elif is_instance(obj, property):
            for accessor in (obj.fget, obj.fset, obj.fdel):
                if accessor is not None:
                    self.add(accessor)
        else:
            self.add(obj.func if is_instance(obj, functools.cached_property) else obj.__func__)

    def function(self, fn: types.FunctionType) -> None:
        self.text("function", fn.__qualname__)
        self.code(fn.__code__)
        self.value(fn.__defaults__)
        self.value(fn.__kwdefaults__)
        for cell in fn.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                self.text("empty cell")
            else:
                self.value(contents)
        self.globals_of(fn.__code__, fn.__globals__)

    def code(self, code: types.CodeType) -> None:
        self.hash.update(code.co_code)
        self.text(code.co_names, code.co_varnames, code.co_freevars, code.co_argcount, code.co_kwonlyargcount)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const)
            else:
                self.text(type(const).__name__, repr(const))

    def globals_of(self, code: types.CodeType, namespace: dict[str, Any]) -> None:
        """The functions, classes and settings a code object reads through its global names."""
        attribute_names = sorted(_names(code))
        for name in sorted(_globals_read(code)):
            if name not in namespace:  # a builtin
                continue
            target = namespace[name]
            if is_instance(target, types.ModuleType):
                if is_library(target.__name__):
                    continue
                self.text("module", name)
                for attribute in attribute_names:  # helpers.scale(x): "scale" is an attribute name
                    if attribute in vars(target):
                        self.text("global", name, attribute)
                        self.setting(vars(target)[attribute])
            else:
                self.text("global", name)
                self.setting(target)

    def setting(self, value: Any, top: bool = True) -> None:
        """Hash what code reads from a global or a class: code by its code, plain data, containers and
        config holders (a dataclass, a namespace) by what they hold; any other object by its type only (a
        registry, a logger: the library's state, not the step's setup). Code inside a container counts by
        its name: a registry of functions is the library's, and its code is reached where it is called."""
        if is_instance(value, CODE) and not top:
            self.text("code", qualname(value))
        elif is_instance(value, CODE) or _plain_kind(value):
            self.value(value)
        elif is_instance(value, CONTAINERS):
            self.node(
                value, lambda v: self.container(v, lambda item: self.setting(item, top=False)), "setting"
            )
        elif is_instance(value, NAMESPACES) or _is_dataclass_instance(value):
            self.node(value, self._holder, "setting")
        elif is_instance(value, DESCRIPTORS):
            self.add(value)
        else:
            self.text("object", qualname(value))

    def _holder(self, value: Any) -> None:
        self.add(type(value))
        for name, attribute in sorted_items(attributes(value)):
            self.text("attribute", name)
            self.setting(attribute, top=False)

    def cls(self, cls: type) -> None:
        self.text("class", cls.__qualname__)
        for base in cls.__bases__:
            self.add(base)
        for name, member in sorted(vars(cls).items()):
            if name in _CLASS_SKIP:
                continue
            self.text(name)
            self.setting(member)


def _plain_kind(value: Any) -> bool:
    """Plain data: a scalar or string (or a subclass: an IntEnum), a torch dtype or device, a tensor."""
    return is_instance(value, (*PLAIN, *TORCH_NAMES, torch.Tensor, enum.Enum)) or is_array(value)


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(type(value)) and not is_instance(value, type)


def _names(code: types.CodeType) -> set[str]:
    """The global and attribute names a code object and the code nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


_OP = dis.opmap
_READ, _WRITE = {_OP["LOAD_GLOBAL"], _OP["LOAD_NAME"]}, {_OP["STORE_GLOBAL"], _OP["DELETE_GLOBAL"]}
_GLOBAL_SHIFT = 1 if sys.version_info >= (3, 11) else 0  # LOAD_GLOBAL's low bit is a flag since 3.11


@functools.lru_cache(maxsize=8192)
def _globals_read(code: types.CodeType) -> frozenset[str]:
    """The global names a code object (and the code nested in it) reads but never writes: a global the
    step itself updates (a counter) is its state, not its setup. Read from the bytecode directly (``dis``
    takes a hundred times as long), once per code object."""
    read, written = set(), set()
    raw, names, extended = code.co_code, code.co_names, 0
    for i in range(0, len(raw) - 1, 2):
        op, arg = raw[i], raw[i + 1] | extended
        extended = arg << 8 if op == dis.EXTENDED_ARG else 0
        if op in _READ:
            index = arg >> _GLOBAL_SHIFT if op == _OP["LOAD_GLOBAL"] else arg
            read.add(names[index] if index < len(names) else "")
        elif op in _WRITE:
            written.add(names[arg] if arg < len(names) else "")
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            read |= _globals_read(const)
    return frozenset(read - written)


def code_digest(*objects: Any) -> str:
    """The SHA-256 hex digest of the code of ``objects`` (functions, classes, callables) and of what
    they reach."""
    digest = Digest()
    for obj in objects:
        digest.add(obj)
    return digest.hexdigest()


def value_digest(*values: Any) -> str:
    """The SHA-256 hex digest of ``values``: what they hold, never where they live or their tensors' data."""
    digest = Digest()
    for value in values:
        digest.value(value)
    return digest.hexdigest()
