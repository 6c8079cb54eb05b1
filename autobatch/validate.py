"""Value checks: each takes ``(value, name)``, returns the value (normalised) or raises a usage error.

Every message names the argument, what was expected and what was got, in the manner of torchmetrics:
"Expected `margin` to be a fraction in [0, 1), but got 1.5." The option objects of :mod:`autobatch.options`
run these checks once, for every entry point.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from autobatch.errors import UsageTypeError, UsageValueError

if TYPE_CHECKING:
    import torch

__all__ = [
    "check_bool",
    "check_callable",
    "check_device",
    "check_fraction",
    "check_optional_bool",
    "check_path",
    "check_positive_int",
    "check_positive_number",
    "check_sample_dimension",
    "check_seed",
    "optional",
]

T = TypeVar("T")

SEED_BOUND = 2**63
"""Seeds are ints in ``[0, 2**63)``: what every generator autobatch seeds (torch, Python, NumPy) takes."""


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def optional(check: Callable[[Any, str], T]) -> Callable[[Any, str], T | None]:
    """``check``, letting ``None`` through."""

    def check_or_none(value: Any, name: str) -> T | None:
        return None if value is None else check(value, name)

    check_or_none.__name__ = f"optional_{check.__name__}"
    return check_or_none


def check_positive_int(value: Any, name: str) -> int:
    """An int ≥ 1 (bools are refused).

    Example:
        >>> check_positive_int(3, "epochs")
        3
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageTypeError(f"Expected `{name}` to be a positive int, but got {_got(value)}.")
    if value < 1:
        raise UsageValueError(f"Expected `{name}` to be a positive int, but got {value}.")
    return value


def check_positive_number(value: Any, name: str) -> float:
    """A finite number > 0 (bools and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageTypeError(f"Expected `{name}` to be a positive number, but got {_got(value)}.")
    if not (math.isfinite(value) and value > 0):
        raise UsageValueError(f"Expected `{name}` to be a positive, finite number, but got {value!r}.")
    return float(value)


def check_fraction(value: Any, name: str) -> float:
    """A number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageTypeError(f"Expected `{name}` to be a fraction in [0, 1), but got {_got(value)}.")
    if not 0.0 <= value < 1.0:
        raise UsageValueError(f"Expected `{name}` to be a fraction in [0, 1), but got {value!r}.")
    return float(value)


def check_bool(value: Any, name: str) -> bool:
    """``True`` or ``False`` only: a truthy string such as ``"false"`` is refused, not taken as ``True``."""
    if not isinstance(value, bool):
        raise UsageTypeError(f"Expected `{name}` to be True or False, but got {_got(value)}.")
    return value


def check_optional_bool(value: Any, name: str) -> bool | None:
    """``True``, ``False`` or ``None`` (automatic)."""
    if value is not None and not isinstance(value, bool):
        raise UsageTypeError(f"Expected `{name}` to be True, False or None, but got {_got(value)}.")
    return value


def check_callable(value: Any, name: str) -> Callable[..., Any]:
    """A function (or any callable that is not a class)."""
    if isinstance(value, type) or not callable(value):
        raise UsageTypeError(f"Expected `{name}` to be a function, but got {_got(value)}.")
    return value


def check_seed(value: Any, name: str) -> int:
    """An int in ``[0, 2**63)``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageTypeError(f"Expected `{name}` to be an int in [0, 2**63), but got {_got(value)}.")
    if not 0 <= value < SEED_BOUND:
        raise UsageValueError(f"Expected `{name}` to be an int in [0, 2**63), but got {value}.")
    return value


def check_path(value: Any, name: str) -> str | os.PathLike[str]:
    """A non-empty str or ``os.PathLike``."""
    if not isinstance(value, (str, os.PathLike)):
        raise UsageTypeError(f"Expected `{name}` to be a path (str or os.PathLike), but got {_got(value)}.")
    if isinstance(value, str) and not value.strip():
        raise UsageValueError(f"Expected `{name}` to be a directory path, but got {value!r}.")
    return value


def check_device(value: Any, name: str) -> torch.device:
    """A ``torch.device`` or a string naming one (``"cuda"``, ``"cuda:1"``, ``"cpu"``).

    Only the spelling is checked here; whether the device exists is :mod:`autobatch.session`'s business.

    Example:
        >>> check_device("cpu", "device")
        device(type='cpu')
    """
    import torch  # here, not at the top: the command line parses its flags before torch is loaded

    if not isinstance(value, (str, torch.device)):
        raise UsageTypeError(f"Expected `{name}` to be a str or torch.device, but got {_got(value)}.")
    try:
        return torch.device(value)
    except RuntimeError as exc:
        raise UsageValueError(
            f"Expected `{name}` to be a device such as 'cuda', 'cuda:1' or 'cpu', but got {value!r}."
        ) from exc


def check_sample_dimension(tensors: Sequence[torch.Tensor], name: str, samples: int | None = None) -> None:
    """The tensors of ``name`` share their first (sample) dimension (of ``samples``, where given): cut into
    batches or micro-batches at the same bounds, tensors that disagree would lose samples without a word."""
    lengths = {int(t.shape[0]) if t.ndim else -1 for t in tensors}
    if samples is not None:
        lengths.add(samples)
    if len(lengths) > 1 or -1 in lengths:
        shapes = [tuple(t.shape) for t in tensors]
        raise UsageValueError(
            f"Expected `{name}` tensors to share their first (sample) dimension, but got shapes {shapes}."
        )
