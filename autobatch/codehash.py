"""A digest of the code a training step runs: it changes whenever that code does.

The probe cache must not serve an answer measured for other code. A step's memory depends on the code of
the model's own module classes (an edited ``forward``), the helpers that code calls, and the loss, step and
size functions — lambdas included, which all share the name ``<lambda>``. :func:`code_digest` hashes what
Python runs, not names or source files: each function's bytecode, its constants (nested functions too),
the names it uses, its defaults and the values its closure captured, and, recursively, what it reaches
through its globals: the functions and classes (a helper in the user's module, a method of a user class)
and the values (a module-level constant such as ``COPIES = 4``) its code names. A bound method counts
with its instance, a callable object with its class and state (:mod:`autobatch.valuehash`). Classes
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

import dis
import functools
import types
from typing import Any

from autobatch.valuehash import ValueWalk, is_instance, is_library

__all__ = ["Digest", "code_digest", "data_digest", "is_library", "value_digest"]

_CLASS_SKIP = frozenset({"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__"})
_DESCRIPTORS = (staticmethod, classmethod, property, functools.cached_property, functools.partialmethod)


class Digest(ValueWalk):
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
        elif is_instance(obj, (types.MethodType, functools.partial, *_DESCRIPTORS)):
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
        """The functions, classes and values a code object reads through its global names."""
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
                        self.add(vars(target)[attribute])
            else:
                self.text("global", name)
                self.add(target)

    def cls(self, cls: type) -> None:
        self.text("class", cls.__qualname__)
        for base in cls.__bases__:
            self.add(base)
        for name, member in sorted(vars(cls).items()):
            if name in _CLASS_SKIP:
                continue
            self.text(name)
            self.add(member)


def _names(code: types.CodeType) -> set[str]:
    """The global and attribute names a code object and the code nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


_READ, _WRITE = frozenset({"LOAD_GLOBAL", "LOAD_NAME"}), frozenset({"STORE_GLOBAL", "DELETE_GLOBAL"})


def _globals_read(code: types.CodeType) -> set[str]:
    """The global names a code object (and the code nested in it) reads but never writes: a global the
    step itself updates (a counter) is its state, not its setup."""
    read, written = set(), set()
    stack = [code]
    while stack:
        current = stack.pop()
        for instruction in dis.get_instructions(current):
            if instruction.opname in _READ:
                read.add(instruction.argval)
            elif instruction.opname in _WRITE:
                written.add(instruction.argval)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return read - written


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


def data_digest(*values: Any) -> str:
    """The SHA-256 hex digest of datasets and collate functions: their code, settings and transforms,
    never their samples."""
    digest = Digest()
    for value in values:
        digest.data(value)
    return digest.hexdigest()
