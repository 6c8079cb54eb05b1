"""Import strings for the command line: ``package.module:attr`` or ``path/to/file.py:attr``.

Each way a spec can be wrong gets one line that says what was expected and what was found, in the manner
of uvicorn's import-string errors: a malformed spec, a module that is not there, a file that is not
there, a missing attribute. An exception raised *while* the user's module runs is the user's own error and
propagates unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from autobatch.errors import UsageValueError

__all__ = ["SpecError", "load_spec"]


class SpecError(UsageValueError):
    """A ``MODULE:ATTR`` spec that cannot be resolved (a usage error: the CLI exits with 2)."""


def _is_path(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def _import_file(path_text: str, spec: str, what: str) -> ModuleType:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise SpecError(f"{what} {spec!r}: file {path_text!r} does not exist.")
    if path.suffix != ".py":
        raise SpecError(f"{what} {spec!r}: expected a Python file ending in .py, but got {path_text!r}.")
    name = f"_autobatch_spec_{path.stem}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:  # pragma: no cover - a .py file always has one
        raise SpecError(f"{what} {spec!r}: cannot load {path_text!r} as a Python module.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    # The file's own directory is importable while it runs, as for `python path/to/file.py`.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        with _own_argv(str(path)):
            module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


@contextlib.contextmanager
def _own_argv(program: str) -> Iterator[None]:
    """While the user's module is imported, ``sys.argv`` holds only its name, as ``python module.py`` gives:
    a script that parses its arguments at import must not see autobatch's."""
    saved = sys.argv
    sys.argv = [program]
    try:
        yield
    finally:
        sys.argv = saved


def _import_module(module_name: str, spec: str, what: str) -> ModuleType:
    sys.path.insert(0, "")  # like `python -m`: modules in the working directory can be named
    try:
        with _own_argv(module_name):
            return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the module the spec names (or one of its parents) being absent is a spec error; a missing
        # import *inside* the user's module is their bug and keeps its traceback.
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise SpecError(f"{what} {spec!r}: could not import module {module_name!r}.") from None
        raise
    finally:
        sys.path.remove("")


def load_spec(spec: str, what: str = "model") -> Any:
    """Resolve ``spec`` to the object it names.

    Args:
        spec: ``package.module:attr`` (a module importable from the working directory or the
            environment) or ``path/to/file.py:attr``; ``attr`` may be dotted (``module:Class.factory``).
        what: the argument's name for messages (``"model"``, ``"--data"``).

    Raises:
        SpecError: the spec is malformed, its module or file does not exist, or the attribute is missing.

    Example:
        >>> load_spec("collections:OrderedDict").__name__
        'OrderedDict'
    """
    if not isinstance(spec, str):
        raise SpecError(f"Expected {what} to be a string 'module:attr', but got {type(spec).__name__}.")
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr or any(not part for part in attr.split(".")):
        raise SpecError(
            f"Expected {what} as 'package.module:attr' or 'path/to/file.py:attr', but got {spec!r}."
        )
    module = (
        _import_file(module_name, spec, what)
        if _is_path(module_name)
        else _import_module(module_name, spec, what)
    )
    obj: Any = module
    for depth, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = f"module {module_name!r}" if depth == 0 else f"{'.'.join(attr.split('.')[:depth])!r}"
            raise SpecError(f"{what} {spec!r}: attribute {part!r} not found in {where}.")
        obj = getattr(obj, part)
    return obj
