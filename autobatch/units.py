"""Byte quantities: parse a memory limit (``"8GiB"``) and format a byte count for people (``"1.50 KiB"``).

Imports nothing heavy (no torch), so the command line can use it before torch is loaded.
"""

from __future__ import annotations

import math
import re

from autobatch.errors import UsageTypeError, UsageValueError

__all__ = ["format_bytes", "parse_memory_limit"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
}
_LIMIT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_memory_limit(value: int | str | None, *, name: str = "memory_limit") -> int | None:
    """Turn a memory limit into bytes.

    Args:
        value: ``None`` (no limit), a positive int of bytes, or a string such as ``"8GiB"``,
            ``"512MiB"``, ``"1.5GB"`` (binary units KiB/MiB/GiB/TiB or K/M/G/T; decimal KB/MB/GB/TB).
        name: the argument name used in error messages.

    Raises:
        UsageTypeError: ``value`` is neither ``None``, an int nor a str.
        UsageValueError: the string does not parse or the amount is not positive.

    Example:
        >>> parse_memory_limit("512MiB"), parse_memory_limit("1.5GB"), parse_memory_limit(4096)
        (536870912, 1500000000, 4096)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageTypeError(
            f"Expected `{name}` to be an int of bytes or a string such as '8GiB', "
            f"but got {value!r} ({type(value).__name__})."
        )
    if isinstance(value, int):
        nbytes = value
    else:
        match = _LIMIT_RE.match(value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise UsageValueError(
                f"Expected `{name}` to be a size such as '8GiB', '512MiB' or '1.5GB', but got {value!r}."
            )
        nbytes = int(float(match.group(1)) * _UNITS[unit])
    if nbytes <= 0:
        raise UsageValueError(f"Expected `{name}` to be a positive size, but got {value!r}.")
    return nbytes


def format_bytes(n: float, *, up: bool = False) -> str:
    """Render a byte count for people; with ``up``, rounded up (a limit that holds ``n`` bytes).

    Example:
        >>> format_bytes(1536), format_bytes(300), format_bytes(5 * 2**30)
        ('1.50 KiB', '300 B', '5.00 GiB')
        >>> format_bytes(1.5 * 2**20 + 1), format_bytes(1.5 * 2**20 + 1, up=True)
        ('1.50 MiB', '1.51 MiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            if unit == "B":
                return f"{math.ceil(n) if up else n:.0f} B"
            return f"{math.ceil(n * 100) / 100 if up else n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
