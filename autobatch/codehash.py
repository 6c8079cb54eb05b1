"""A digest of the code a training step runs: it changes whenever that code does.

The probe cache must not serve an answer measured for other code. A step's memory depends on the code of
the model's own module classes (an edited ``forward``), the helpers that code calls, and the loss, step and
size functions — lambdas included, which all share the name ``<lambda>``. :func:`code_digest` hashes what
Python runs, not names or source files: each function's bytecode, its constants (nested functions too),
the names it uses, its defaults and the values its closure captured, and, recursively, the functions and
classes it reaches through its globals (a helper in the user's module, a method of a user class). Classes
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

import functools
import hashlib
import sys
import types
from typing import Any

__all__ = ["code_digest", "is_library"]

_LIBRARIES = frozenset({"torch", "torchvision", "torchaudio", "numpy", "builtins", "_operator"})
_MAX_OBJECTS = 20_000
"""Objects hashed per digest at most: a bound on pathological reference graphs."""


def is_library(module: str | None) -> bool:
    """Whether code from ``module`` counts by name only (standard library, torch, NumPy)."""
    top = (module or "builtins").split(".")[0]
    return top in _LIBRARIES or top in sys.stdlib_module_names


class _Digest:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.seen: set[int] = set()

    def text(self, *parts: object) -> None:
        for part in parts:
            self.hash.update(str(part).encode())
            self.hash.update(b"\0")

    def add(self, obj: Any) -> None:
        """Hash a function, class, method, partial or callable object (and what it reaches)."""
        if id(obj) in self.seen or len(self.seen) > _MAX_OBJECTS:
            self.text("seen", getattr(obj, "__qualname__", type(obj).__qualname__))
            return
        self.seen.add(id(obj))
        if isinstance(obj, (types.MethodType, staticmethod, classmethod)):
            self.add(obj.__func__)
        elif isinstance(obj, functools.partial):
            self.text("partial")
            self.add(obj.func)
            self.value(obj.args)
            self.value(obj.keywords)
        elif isinstance(obj, types.FunctionType):
            self.function(obj)
        elif isinstance(obj, type):
            self.cls(obj)
        elif isinstance(obj, property):
            for accessor in (obj.fget, obj.fset, obj.fdel):
                if accessor is not None:
                    self.add(accessor)
        elif callable(obj) and not isinstance(obj, types.BuiltinFunctionType):
            self.text("callable")
            self.add(type(obj))
            self.value(getattr(obj, "__dict__", {}))
        else:
            self.text("name", getattr(obj, "__module__", ""), getattr(obj, "__qualname__", repr(type(obj))))

    def function(self, fn: types.FunctionType) -> None:
        if is_library(fn.__module__):
            self.text("library", fn.__module__, fn.__qualname__)
            return
        self.text("function", fn.__qualname__)
        self.code(fn.__code__)
        self.value(fn.__defaults__)
        self.value(fn.__kwdefaults__)
        for cell in fn.__closure__ or ():
            try:
                self.value(cell.cell_contents)
            except ValueError:  # an empty cell
                self.text("empty cell")
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
        """The user functions, classes and modules a code object reaches through its global names."""
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names |= set(const.co_names)
        for name in sorted(names):
            target = namespace.get(name)
            if isinstance(target, types.ModuleType):
                if is_library(target.__name__):
                    continue
                for attribute in sorted(names):  # helpers.scale(x): "helpers" and "scale" are both names
                    member = getattr(target, attribute, None)
                    if isinstance(member, (types.FunctionType, type)):
                        self.add(member)
            elif isinstance(target, (types.FunctionType, type, functools.partial)):
                self.add(target)

    def cls(self, cls: type) -> None:
        if is_library(cls.__module__):
            self.text("library class", cls.__module__, cls.__qualname__)
            return
        self.text("class", cls.__qualname__)
        for base in cls.__bases__:
            self.add(base)
        for name, member in sorted(vars(cls).items()):
            if name in ("__dict__", "__weakref__", "__doc__", "__module__", "__qualname__"):
                continue
            self.text(name)
            if isinstance(member, (types.FunctionType, staticmethod, classmethod, property, type)):
                self.add(member)
            else:
                self.value(member)

    def value(self, value: Any) -> None:
        """A captured or default value: plain values by repr, functions by code, tensors by shape."""
        if value is None or isinstance(value, (bool, int, float, str, bytes, complex)):
            self.text(type(value).__name__, repr(value))
        elif isinstance(value, (tuple, list, frozenset, set)):
            self.text(type(value).__name__, len(value))
            for item in sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value:
                self.value(item)
        elif isinstance(value, dict):
            self.text("dict", len(value))
            for key in sorted(value, key=repr):
                self.value(key)
                self.value(value[key])
        elif isinstance(value, (types.FunctionType, types.MethodType, functools.partial, type)):
            self.add(value)  # before arrays: a class such as torch.Tensor has `shape` and `dtype` too
        elif hasattr(value, "shape") and hasattr(value, "dtype"):  # tensors and arrays: not their values
            self.text("array", tuple(value.shape), value.dtype)
        else:  # an object: its type and its plain attributes (a flag, a count), never its address
            self.text("object", type(value).__module__, type(value).__qualname__)
            for name, attribute in sorted(getattr(value, "__dict__", {}).items()):
                if attribute is None or isinstance(attribute, (bool, int, float, str)):
                    self.text(name, repr(attribute))


def code_digest(*objects: Any) -> str:
    """The SHA-256 hex digest of the code of ``objects`` (functions, classes, callables) and of what
    they reach."""
    digest = _Digest()
    for obj in objects:
        digest.add(obj)
    return digest.hash.hexdigest()
