"""Normalise what users pass as data into one :class:`DataSource`.

A source is a dataset plus the way to collate it: batches are built from lists of sample indices, so that
the probe can assemble the worst-case batch (the largest samples) and the training loop can re-batch the
data into optimizer steps and split each step into micro-batches of any size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data import TensorDataset as _TensorDataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["DataSource", "as_source", "batch_size_of", "default_size", "map_tensors", "slice_batch"]

logger = logging.getLogger(__name__)

SIZE_SCAN_LIMIT = 50_000
"""Datasets larger than this are sized on a seeded sample of this many samples, not all of them."""

SizeFn = Callable[[Any], float]


def default_size(sample: Any) -> float:
    """How large a sample is: the total number of elements of its tensors (and lengths of lists)."""
    if isinstance(sample, torch.Tensor):
        return float(sample.numel())
    if isinstance(sample, Mapping):
        return sum(default_size(v) for v in sample.values())
    if isinstance(sample, (list, tuple)):
        if sample and all(isinstance(v, (int, float)) for v in sample):
            return float(len(sample))
        return sum(default_size(v) for v in sample)
    if hasattr(sample, "shape"):  # numpy arrays
        return float(getattr(sample, "size", 1))
    return 1.0


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """Apply ``fn`` to every tensor of a batch (tensors, dicts, tuples and lists of them).

    A plain recursion: cheaper than a generic pytree walk on the hot path of every micro-step.
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


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a collated batch (tensors, lists, dicts and tuples of them)."""
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
    """The number of samples in a collated batch (the first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0]) if _is_nested(batch) else len(batch)
    raise TypeError(f"Cannot tell the batch size of a {type(batch).__name__}.")


class _StepSampler(Sampler[list[int]]):
    def __init__(self, steps: Sequence[list[int]]) -> None:
        self.steps = steps

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


class DataSource:
    """A dataset, its collate function and loader settings, batched by index lists.

    Build one with :func:`as_source`.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        sampler: Iterable[Any] | None = None,
        loader_kwargs: dict[str, Any] | None = None,
        tensors: tuple[torch.Tensor, ...] | None = None,
        name: str = "data",
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.sampler = sampler
        self.loader_kwargs = loader_kwargs or {}
        self._tensors = tensors
        try:
            self.length = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"Expected `{name}` to be a map-style dataset with __len__ and __getitem__, but got "
                f"{type(dataset).__name__} without __len__ (iterable datasets cannot be re-batched)."
            ) from None
        if self.length == 0:
            raise ValueError(f"Expected `{name}` to be a non-empty dataset, but got one with 0 samples.")
        self._order_by_size: dict[SizeFn, list[int]] = {}

    def __len__(self) -> int:
        return self.length

    @property
    def uniform(self) -> bool:
        """Whether every sample has the same shape (tensors ``(X, y)``), so any batch is the worst."""
        return self._tensors is not None

    def batch(self, indices: Sequence[int]) -> Any:
        """Collate the samples at ``indices`` into one batch."""
        if self._tensors is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            return tuple(t[idx] for t in self._tensors)
        return self.collate_fn([self.dataset[i] for i in indices])

    def check_labelled(self, name: str = "data") -> None:
        """Raise unless a sample carries labels: a dict, or a sequence ``(*inputs, target)``."""
        sample = self.dataset[0]
        if isinstance(sample, Mapping) or (isinstance(sample, (tuple, list)) and len(sample) >= 2):
            return
        raise ValueError(
            f"Expected `{name}` samples to be (inputs, targets) pairs or dicts, but got a "
            f"{type(sample).__name__} without labels. Add targets, or pass "
            "`step_fn=lambda model, batch: loss` to compute the loss yourself."
        )

    def epoch_order(self, shuffle: bool | None, generator: torch.Generator, epoch: int = 0) -> list[int]:
        """The sample order of one epoch: the DataLoader's sampler when it had one, else by ``shuffle``.

        A ``DistributedSampler`` gives the global order it shards (its seed plus ``epoch``, as after
        ``set_epoch``), without its padding: the training loop cuts each step into per-rank shares.
        """
        if isinstance(self.sampler, DistributedSampler) and shuffle is None:
            if not self.sampler.shuffle:
                return list(range(self.length))
            seeded = torch.Generator().manual_seed(self.sampler.seed + epoch)
            return torch.randperm(self.length, generator=seeded).tolist()
        if self.sampler is not None and shuffle is None:
            return [int(i) for i in self.sampler]
        if shuffle is False:
            return list(range(self.length))
        return torch.randperm(self.length, generator=generator).tolist()

    def largest_first(self, size_fn: SizeFn | None = None) -> list[int]:
        """Sample indices from the largest to the smallest, by ``size_fn`` (ties keep dataset order)."""
        if self.uniform and size_fn is None:
            return list(range(self.length))
        fn = size_fn or default_size
        if fn in self._order_by_size:  # the probe asks once per trial: size the dataset once
            return self._order_by_size[fn]
        candidates: Sequence[int] = range(self.length)
        if self.length > SIZE_SCAN_LIMIT:
            generator = torch.Generator().manual_seed(0)
            candidates = torch.randperm(self.length, generator=generator)[:SIZE_SCAN_LIMIT].tolist()
            logger.warning(
                "Sizing %d of %d samples to find the largest ones; pass a `size_fn` that reads sizes "
                "cheaply, or sort your dataset, for an exact worst case.",
                SIZE_SCAN_LIMIT,
                self.length,
            )
        order = sorted(candidates, key=lambda i: -fn(self.dataset[i]))
        self._order_by_size[fn] = order
        return order

    def worst_case(self, batch_size: int, size_fn: SizeFn | None = None) -> Any:
        """A batch of the ``batch_size`` largest samples: the most memory a batch of that size can need."""
        return self.batch(self.largest_first(size_fn)[:batch_size])

    def loader(self, steps: Sequence[list[int]]) -> Iterator[Any]:
        """Yield one collated batch per index list, with the original DataLoader's worker settings."""
        workers_or_pinning = self.loader_kwargs.get("num_workers") or self.loader_kwargs.get("pin_memory")
        if self._tensors is not None or not workers_or_pinning:
            return (self.batch(indices) for indices in steps)
        loader = DataLoader(
            self.dataset,
            batch_sampler=_StepSampler(steps),
            collate_fn=self.collate_fn,
            **self.loader_kwargs,
        )
        return iter(loader)


_LOADER_SETTINGS = (
    "num_workers",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
)


def as_source(data: Any, *, name: str = "data") -> DataSource:
    """Normalise a Dataset, a DataLoader, a DataSource or tensors ``(X, y)`` into a :class:`DataSource`.

    Raises:
        TypeError: ``data`` is none of these.
        ValueError: the tensors disagree in length, or the data is empty.
    """
    if isinstance(data, DataSource):
        return data
    if isinstance(data, (str, bytes)):
        raise TypeError(
            f"Expected `{name}` to be a torch Dataset, a DataLoader or a tuple of tensors (X, y), but got "
            f"the {type(data).__name__} {data!r}; load the data into one of those first."
        )
    if isinstance(data, DataLoader):
        kwargs = {k: getattr(data, k) for k in _LOADER_SETTINGS if hasattr(data, k)}
        if not kwargs.get("num_workers"):
            kwargs = {"num_workers": 0, "pin_memory": kwargs.get("pin_memory", False)}
        elif kwargs.get("prefetch_factor") is None:
            kwargs.pop("prefetch_factor", None)
        tensors = _tensor_dataset_tensors(data.dataset, data.collate_fn)
        return DataSource(
            data.dataset,
            collate_fn=data.collate_fn,
            sampler=data.sampler,
            loader_kwargs=kwargs,
            tensors=tensors,
            name=name,
        )
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        tensors = tuple(data)
        lengths = {int(t.shape[0]) if t.ndim else -1 for t in tensors}
        if len(lengths) != 1 or -1 in lengths:
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(
                f"Expected `{name}` tensors to share their first (sample) dimension, but got shapes {shapes}."
            )
        return DataSource(_TensorDataset(*tensors), tensors=tensors, name=name)
    # Strings and dicts have __getitem__ and __len__ too, but a dict of tensors is no dataset.
    sized = hasattr(data, "__getitem__") and hasattr(data, "__len__")
    if isinstance(data, Dataset) or (sized and not isinstance(data, (str, bytes, Mapping))):
        return DataSource(data, tensors=_tensor_dataset_tensors(data, None), name=name)
    raise TypeError(
        f"Expected `{name}` to be a torch Dataset, a DataLoader or a tuple of tensors (X, y), "
        f"but got {type(data).__name__}."
    )


def _tensor_dataset_tensors(dataset: Any, collate_fn: Any) -> tuple[torch.Tensor, ...] | None:
    """The tensors of a plain TensorDataset collated by default: batched by fast indexing instead."""
    if type(dataset) is _TensorDataset and collate_fn in (None, default_collate):
        return tuple(dataset.tensors)
    return None
