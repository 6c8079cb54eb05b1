"""Walk the tensors of a batch: tensors, dicts, tuples (named ones too) and lists of them.

Plain recursions rather than a generic pytree walk: they run on the hot path of every micro-step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

__all__ = ["batch_size_of", "iter_tensors", "map_tensors", "slice_batch"]


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """Apply ``fn`` to every tensor of ``batch``, keeping its structure.

    Example:
        >>> map_tensors(lambda t: t * 2, {"x": torch.ones(2), "n": 3})
        {'x': tensor([2., 2.]), 'n': 3}
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        mapped = [map_tensors(fn, v) for v in batch]
        return type(batch)(*mapped) if hasattr(batch, "_fields") else tuple(mapped)
    if isinstance(batch, list):
        return [map_tensors(fn, v) for v in batch]
    if isinstance(batch, Mapping):
        return type(batch)({k: map_tensors(fn, v) for k, v in batch.items()})  # type: ignore[call-arg]
    return batch


def iter_tensors(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor of ``batch``, depth first."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from iter_tensors(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from iter_tensors(value)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a collated batch.

    Example:
        >>> slice_batch((torch.arange(4), [10, 11, 12, 13]), 1, 3)
        (tensor([1, 2]), [11, 12])
    """
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(slice_batch(v, start, stop) for v in batch)
    if isinstance(batch, list):
        return [slice_batch(v, start, stop) for v in batch] if _is_nested(batch) else batch[start:stop]
    return batch


def _is_nested(batch: Sequence[Any]) -> bool:
    return bool(batch) and all(isinstance(v, (torch.Tensor, Mapping, tuple, list)) for v in batch)


def batch_size_of(batch: Any) -> int:
    """The number of samples in a collated batch (the first dimension of its first tensor).

    Example:
        >>> batch_size_of({"input_ids": torch.zeros(3, 7), "labels": torch.zeros(3)})
        3
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0]) if _is_nested(batch) else len(batch)
    raise TypeError(f"Cannot tell the batch size of a {type(batch).__name__}.")
