"""Normalise what users pass as data into one :class:`DataSource`.

A source is a dataset plus the way to collate it. Batches are built from lists of sample indices, so that
the probe can assemble the worst-case batch (the largest samples) and the training loop can cut the data
into optimizer steps and each step into micro-batches of any size. A step's samples are read once
(:meth:`DataSource.fetch`, in the DataLoader's workers when it had some) and each micro-batch is collated on
its own (:meth:`StepData.collate`): dynamic padding pads a micro-batch to its own longest sample, as a
hand-written accumulation loop would, and a step redone after an out-of-memory back-off re-cuts the same
samples without reading them again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data import TensorDataset as _TensorDataset
from torch.utils.data._utils.collate import default_collate

from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.validate import check_sample_dimension

__all__ = ["DataSource", "SizeFn", "StepData", "as_source", "default_size"]

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


class StepData:
    """The samples of one optimizer step, read once; micro-batches are collated from them on demand.

    ``indices`` are the samples' indices in the dataset, where known (what an error names).
    """

    def __init__(
        self, source: DataSource, samples: Any, count: int, indices: Sequence[int] | None = None
    ) -> None:
        self.source, self.samples, self.count, self.indices = source, samples, count, indices

    def __len__(self) -> int:
        return self.count

    def collate(self, start: int, stop: int) -> Any:
        """The micro-batch of samples ``start:stop``, collated on its own."""
        if self.source._tensors is not None:
            return tuple(t[start:stop] for t in self.samples)
        return self.source.collate_fn(self.samples[start:stop])

    def pieces(self, bounds: Iterable[tuple[int, int]]) -> list[Any]:
        """One collated micro-batch per ``(start, stop)``."""
        return [self.collate(a, b) for a, b in bounds]


class _StepSampler(Sampler[list[int]]):
    def __init__(self, steps: Sequence[list[int]]) -> None:
        self.steps = steps

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def _as_list(samples: list[Any]) -> list[Any]:
    """The workers' "collate": hand the samples back as read; micro-batches are collated later."""
    return samples


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
        self.name = name
        self._tensors = tensors
        try:
            self.length = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise UsageTypeError(
                f"Expected `{name}` to be a map-style dataset with __len__ and __getitem__, but got "
                f"{type(dataset).__name__} without __len__ (iterable datasets cannot be re-batched)."
            ) from None
        if self.length == 0:
            raise UsageValueError(f"Expected `{name}` to be a non-empty dataset, but got one with 0 samples.")
        self._order_by_size: dict[SizeFn, tuple[list[int], list[float]]] = {}

    def __len__(self) -> int:
        return self.length

    @property
    def uniform(self) -> bool:
        """Whether every sample has the same shape (tensors ``(X, y)``), so any batch is the worst."""
        return self._tensors is not None

    def fetch(self, indices: Sequence[int]) -> StepData:
        """Read the samples at ``indices`` (tensors are indexed at once)."""
        if self._tensors is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            return StepData(self, tuple(t[idx] for t in self._tensors), len(indices), indices)
        return StepData(self, [self.dataset[i] for i in indices], len(indices), indices)

    def batch(self, indices: Sequence[int]) -> Any:
        """Collate the samples at ``indices`` into one batch."""
        return self.fetch(indices).collate(0, len(indices))

    def check_labelled(self) -> None:
        """Raise unless a sample carries labels: a dict, or a sequence ``(*inputs, target)``."""
        sample = self.dataset[0]
        if isinstance(sample, Mapping) or (isinstance(sample, (tuple, list)) and len(sample) >= 2):
            return
        raise UsageValueError(
            f"Expected `{self.name}` samples to be (inputs, targets) pairs or dicts, but got a "
            f"{type(sample).__name__} without labels. Add targets, or pass "
            "`step_fn=lambda model, batch: loss` to compute the loss yourself."
        )

    def largest_label(self) -> int | None:
        """The largest class label (the ignore index -100 aside), or ``None`` when the labels are not ints.

        Reads the labels of every sample once, unless they are at hand (tensors, a ``targets`` list).
        """
        if self._tensors is not None:
            labels: Any = self._tensors[-1]
        elif hasattr(self.dataset, "targets"):
            labels = torch.as_tensor(self.dataset.targets)
        else:
            labels = [_label_of(self.dataset[i]) for i in range(self.length)]
            if any(label is None for label in labels):
                return None
            labels = torch.cat([torch.as_tensor(label).reshape(-1) for label in labels])
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
            return None
        labels = labels[labels != -100]
        return int(labels.max()) if labels.numel() else None

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
        return self._sized(size_fn)[0]

    def _sized(self, size_fn: SizeFn | None) -> tuple[list[int], list[float]]:
        """The indices from the largest sample to the smallest, and their sizes (sized once per fn)."""
        if self.uniform and size_fn is None:
            return list(range(self.length)), [1.0] * self.length
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
        if size_fn is None:
            sizes = {i: default_size(self.dataset[i]) for i in candidates}
        else:
            sizes = {i: _size_of(size_fn, self.dataset[i], i) for i in candidates}
        order = sorted(candidates, key=lambda i: -sizes[i])
        self._order_by_size[fn] = (order, [sizes[i] for i in order])
        return self._order_by_size[fn]

    def worst_case(self, batch_size: int, size_fn: SizeFn | None = None) -> Any:
        """A batch of the ``batch_size`` largest samples: the most memory a batch of that size can need."""
        return self.batch(self.largest_first(size_fn)[:batch_size])

    def mixed_case(self, batch_size: int, size_fn: SizeFn | None = None) -> Any | None:
        """The ``batch_size - 1`` largest samples and the smallest one, or ``None`` when that is no other
        batch than :meth:`worst_case` (one sample, or samples all of one size).

        Collated together the small sample is padded: a model may then take another path than on the
        all-longest batch (BERT builds a 4-D attention mask only when some position is padding), and a
        padded batch of the longest shape is what training meets all the time.
        """
        indices = self.mixed_indices(batch_size, size_fn)
        return None if indices is None else self.batch(indices)

    def mixed_indices(self, batch_size: int, size_fn: SizeFn | None = None) -> list[int] | None:
        """The samples of :meth:`mixed_case` (``None`` where there is none), without reading them twice."""
        if batch_size < 2 or (self.uniform and size_fn is None):
            return None
        order, sizes = self._sized(size_fn)
        if sizes[min(batch_size, len(order)) - 1] == sizes[-1]:
            return None
        return [*order[: batch_size - 1], order[-1]]

    def loader(self, steps: Sequence[list[int]]) -> Iterator[StepData]:
        """Yield each step's samples, read with the original DataLoader's worker settings."""
        workers_or_pinning = self.loader_kwargs.get("num_workers") or self.loader_kwargs.get("pin_memory")
        if self._tensors is not None or not workers_or_pinning:
            return (self.fetch(indices) for indices in steps)
        loader = DataLoader(
            self.dataset, batch_sampler=_StepSampler(steps), collate_fn=_as_list, **self.loader_kwargs
        )
        return (
            StepData(self, samples, len(samples), indices)
            for indices, samples in zip(steps, loader, strict=False)
        )


def _size_of(size_fn: SizeFn, sample: Any, index: int) -> float:
    """``size_fn(sample)`` as a float; anything but a finite number is refused, naming ``size_fn``."""
    size = size_fn(sample)
    number: float | None = None
    if not isinstance(size, (str, bytes)):
        try:
            number = float(size)  # ints, floats, numpy scalars, one-element tensors
        except (TypeError, ValueError, RuntimeError):
            number = None
    fix = "Return the sample's size as a number, e.g. size_fn=lambda sample: len(sample[0])."
    if number is None:
        got = f"a tensor of shape {tuple(size.shape)}" if isinstance(size, torch.Tensor) else repr(size)
        raise UsageTypeError(
            f"Expected `size_fn` to return a number for each sample (its size, e.g. its length), but it "
            f"returned {got} ({type(size).__name__}) for sample {index}. {fix}"
        )
    if not math.isfinite(number):
        raise UsageValueError(
            f"Expected `size_fn` to return a finite number for each sample, but it returned {number} for "
            f"sample {index}. {fix}"
        )
    return number


def _label_of(sample: Any) -> Any:
    if isinstance(sample, Mapping):
        return sample.get("labels", sample.get("label"))
    if isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return sample[-1]
    return None


_LOADER_SETTINGS = (
    "num_workers",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "generator",
)


def _loader_source(data: DataLoader[Any], name: str) -> DataSource:
    if data.batch_sampler is None:
        raise UsageValueError(
            f"Expected `{name}` to be a DataLoader of single samples, but got one with batch_size=None, "
            "whose dataset yields ready-made batches; autobatch builds the batches itself. Pass a dataset "
            "of single samples."
        )
    if type(data.batch_sampler) is not BatchSampler:
        raise UsageValueError(
            f"Expected `{name}` to be a DataLoader that autobatch may re-batch, but its batch_sampler is a "
            f"{type(data.batch_sampler).__name__}, which chooses the batches itself. autobatch builds "
            "batches of target_batch samples; pass DataLoader(dataset, sampler=..., collate_fn=...) "
            "instead, or drop the batch_sampler."
        )
    kwargs = {k: getattr(data, k) for k in _LOADER_SETTINGS if getattr(data, k, None) is not None}
    if not kwargs.get("num_workers"):
        kwargs = {"num_workers": 0, "pin_memory": bool(kwargs.get("pin_memory", False))}
    tensors = _tensor_dataset_tensors(data.dataset, data.collate_fn)
    return DataSource(
        data.dataset,
        collate_fn=data.collate_fn,
        sampler=data.sampler,
        loader_kwargs=kwargs,
        tensors=tensors,
        name=name,
    )


def _is_array_like(value: Any) -> bool:
    return isinstance(value, (list, torch.Tensor)) or (hasattr(value, "shape") and hasattr(value, "dtype"))


def _refuse_arrays(data: Sequence[Any], name: str) -> None:
    """``(X, y)`` given as numpy arrays or lists: say how to pass it instead of taking it as 2 samples."""
    kinds = ", ".join(type(v).__name__ for v in data)
    raise UsageTypeError(
        f"Expected `{name}` as tensors (X, y), but got a {type(data).__name__} of ({kinds}). Convert them "
        f"first: (torch.as_tensor(X), torch.as_tensor(y)), or pass a Dataset of samples."
    )


def as_source(data: Any, *, name: str = "data") -> DataSource:
    """Normalise a Dataset, a DataLoader, a DataSource or tensors ``(X, y)`` into a :class:`DataSource`.

    Raises:
        UsageTypeError: ``data`` is none of these (numpy arrays or lists in place of tensors included).
        UsageValueError: the tensors disagree in length, the data is empty, or a DataLoader batches by a
            custom ``batch_sampler`` or not at all.
    """
    if isinstance(data, DataSource):
        return data
    if isinstance(data, (str, bytes)):
        raise UsageTypeError(
            f"Expected `{name}` to be a torch Dataset, a DataLoader or a tuple of tensors (X, y), but got "
            f"the {type(data).__name__} {data!r}; load the data into one of those first."
        )
    if isinstance(data, DataLoader):
        return _loader_source(data, name)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        tensors = tuple(data)
        check_sample_dimension(tensors, name)
        return DataSource(_TensorDataset(*tensors), tensors=tensors, name=name)
    if isinstance(data, tuple) and data and all(_is_array_like(v) for v in data):
        _refuse_arrays(data, name)
    if isinstance(data, list) and 2 <= len(data) <= 4 and all(_is_array_like(v) for v in data):
        lengths = {len(v) for v in data}
        if len(lengths) == 1 and lengths.pop() > len(data):  # [X, y] with more samples than arrays
            _refuse_arrays(data, name)
    # Strings and dicts have __getitem__ and __len__ too, but a dict of tensors is no dataset.
    sized = hasattr(data, "__getitem__") and hasattr(data, "__len__")
    if isinstance(data, Dataset) or (sized and not isinstance(data, (str, bytes, Mapping))):
        return DataSource(data, tensors=_tensor_dataset_tensors(data, None), name=name)
    raise UsageTypeError(
        f"Expected `{name}` to be a torch Dataset, a DataLoader or a tuple of tensors (X, y), "
        f"but got {type(data).__name__}."
    )


def _tensor_dataset_tensors(dataset: Any, collate_fn: Any) -> tuple[torch.Tensor, ...] | None:
    """The tensors of a plain TensorDataset collated by default: batched by fast indexing instead."""
    if type(dataset) is _TensorDataset and collate_fn in (None, default_collate):
        return tuple(dataset.tensors)
    return None
