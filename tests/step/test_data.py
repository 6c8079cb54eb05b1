"""Tests for autobatch.step.data: normalising data, re-batching by index lists, and the worst-case batch."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from autobatch._tree import batch_size_of, slice_batch
from autobatch.step import data as data_module
from autobatch.step.data import DataSource, as_source, default_size
from tests.models import SequenceDataset, pad_collate

X = torch.arange(40, dtype=torch.float32).reshape(10, 4)
Y = torch.arange(10)


class Pairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __len__(self) -> int:
        return len(X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return X[i], Y[i]


class Stream(IterableDataset[torch.Tensor]):
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from X


# --- as_source ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", [tuple, list])
def test_tensors(form: type) -> None:
    source = as_source(form([X, Y]))
    assert len(source) == 10
    assert source.uniform
    x, y = source.batch([3, 1])
    assert torch.equal(x, X[[3, 1]]) and torch.equal(y, Y[[3, 1]])
    assert as_source(source) is source


def test_a_tensor_dataset_is_batched_like_tensors() -> None:
    source = as_source(TensorDataset(X, Y))
    assert source.uniform
    assert torch.equal(source.batch([2, 5])[0], X[[2, 5]])


def test_dataset() -> None:
    source = as_source(Pairs())
    assert len(source) == 10
    assert not source.uniform
    x, y = source.batch([0, 9])
    assert torch.equal(x, X[[0, 9]]) and torch.equal(y, Y[[0, 9]])


def test_dataloader_keeps_collate_fn_and_sampler() -> None:
    dataset = SequenceDataset(30)
    loader = DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=pad_collate)
    source = as_source(loader)
    assert source.dataset is dataset
    assert source.collate_fn is pad_collate
    assert source.sampler is loader.sampler
    assert source.loader_kwargs == {"num_workers": 0, "pin_memory": False}
    tokens, labels = source.batch([0, 1, 2])
    assert tokens.shape == (3, max(len(dataset.samples[i]) for i in range(3)))
    assert torch.equal(labels, dataset.labels[:3])
    order = source.epoch_order(None, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(30))


def test_dataloader_keeps_worker_settings() -> None:
    def init(worker_id: int) -> None:
        torch.manual_seed(worker_id)

    loader = DataLoader(
        Pairs(), num_workers=2, persistent_workers=True, prefetch_factor=3, worker_init_fn=init
    )
    source = as_source(loader)
    assert source.loader_kwargs["num_workers"] == 2
    assert source.loader_kwargs["persistent_workers"] is True
    assert source.loader_kwargs["prefetch_factor"] == 3
    assert source.loader_kwargs["worker_init_fn"] is init
    steps = [[0, 1, 2], [7], [9, 8]]
    batches = list(source.loader(steps))  # read in the workers, collated here
    assert [b.collate(0, len(b))[0].tolist() for b in batches] == [X[s].tolist() for s in steps]


def test_dataloader_of_a_tensor_dataset_is_uniform() -> None:
    assert as_source(DataLoader(TensorDataset(X, Y), batch_size=3)).uniform
    assert not as_source(DataLoader(TensorDataset(X, Y), collate_fn=lambda s: s)).uniform


def test_loader_without_workers_collates_in_process() -> None:
    source = as_source(Pairs())
    batches = list(source.loader([[4, 5], [6]]))
    assert [b.collate(0, len(b))[1].tolist() for b in batches] == [[4, 5], [6]]


def test_length_mismatch() -> None:
    with pytest.raises(ValueError, match=r"`data` tensors to share their first .* \[\(10, 4\), \(9,\)\]"):
        as_source((X, Y[:9]))
    with pytest.raises(ValueError, match="`train` tensors"):
        as_source((X, torch.tensor(3)), name="train")


@pytest.mark.parametrize("empty", [(X[:0], Y[:0]), TensorDataset(X[:0], Y[:0]), []])
def test_empty_data(empty: object) -> None:
    with pytest.raises(ValueError, match="`data` to be a non-empty dataset"):
        as_source(empty)


def test_empty_dataset_message() -> None:
    with pytest.raises(
        ValueError, match="Expected `data` to be a non-empty dataset, but got one with 0 samples"
    ):
        as_source(TensorDataset(X[:0], Y[:0]))


def test_iterable_datasets_are_refused() -> None:
    with pytest.raises(TypeError, match="`data` to be a map-style dataset"):
        as_source(Stream())


@pytest.mark.parametrize("bad", [5, "text", b"bytes", None, {"x": X, "y": Y}, {0: (X[0], Y[0])}])
def test_not_data(bad: object) -> None:
    with pytest.raises(TypeError, match="Expected `data` to be a torch Dataset, a DataLoader or a tuple"):
        as_source(bad)


# --- worst case --------------------------------------------------------------------------------------


def test_largest_first_orders_by_size_with_ties_in_dataset_order() -> None:
    dataset = [(torch.zeros(n), 0) for n in (3, 7, 1, 7, 5)]
    source = as_source(dataset)
    assert source.largest_first() == [1, 3, 4, 0, 2]
    assert source.largest_first() is source.largest_first()  # cached
    assert source.largest_first(lambda s: -float(len(s[0]))) == [2, 0, 4, 1, 3]
    assert source.largest_first() == [1, 3, 4, 0, 2]  # a size_fn does not replace the cache


def test_uniform_data_is_in_dataset_order() -> None:
    assert as_source((X, Y)).largest_first() == list(range(10))


def test_worst_case_holds_the_longest_sequences() -> None:
    dataset = SequenceDataset(50)
    source = as_source(DataLoader(dataset, collate_fn=pad_collate))
    lengths = sorted((len(s) for s in dataset.samples), reverse=True)
    tokens, labels = source.worst_case(5)
    assert tokens.shape == (5, lengths[0])
    assert sorted((tokens != 0).sum(1).tolist(), reverse=True) == lengths[:5]
    assert labels.shape == (5,)


def test_size_scan_is_sampled_on_large_datasets(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(data_module, "SIZE_SCAN_LIMIT", 4)
    dataset = [(torch.zeros(n), 0) for n in range(10)]
    with caplog.at_level(logging.WARNING, logger="autobatch.step.data"):
        order = as_source(dataset).largest_first()
    assert len(order) == 4 and len(set(order)) == 4
    assert order == sorted(order, reverse=True)  # sample i has i elements
    assert "Sizing 4 of 10 samples" in caplog.text


@pytest.mark.parametrize(
    ("sample", "size"),
    [
        (torch.zeros(3, 4), 12.0),
        ((torch.zeros(5), torch.tensor(1)), 6.0),
        ({"ids": torch.zeros(7), "labels": torch.tensor(0)}, 8.0),
        ([1, 2, 3], 3.0),
        (np.zeros((2, 3)), 6.0),
        ("text", 1.0),
        (7, 1.0),
    ],
)
def test_default_size(sample: object, size: float) -> None:
    assert default_size(sample) == size


# --- epochs -----------------------------------------------------------------------------------------


def test_epoch_order() -> None:
    source = as_source((X, Y))
    assert source.epoch_order(False, torch.Generator()) == list(range(10))
    first = source.epoch_order(True, torch.Generator().manual_seed(0))
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert source.epoch_order(None, torch.Generator().manual_seed(0)) == first


# --- batches -----------------------------------------------------------------------------------------


def test_slice_batch() -> None:
    batch = {"x": X, "meta": (Y, ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]), "n": 3}
    part = slice_batch(batch, 2, 5)
    assert torch.equal(part["x"], X[2:5])
    assert torch.equal(part["meta"][0], Y[2:5])
    assert part["meta"][1] == ["c", "d", "e"]
    assert part["n"] == 3
    assert isinstance(part["meta"], tuple)
    nested = slice_batch([X, Y], 0, 2)
    assert isinstance(nested, list) and torch.equal(nested[1], Y[:2])


def test_batch_size_of() -> None:
    assert batch_size_of(X) == 10
    assert batch_size_of(torch.tensor(3.0)) == 1
    assert batch_size_of((X[:4], Y[:4])) == 4
    assert batch_size_of({"ids": X[:6], "labels": Y[:6]}) == 6
    assert batch_size_of([X[:2], Y[:2]]) == 2
    assert batch_size_of(["a", "b", "c"]) == 3
    with pytest.raises(TypeError, match="batch size of a int"):
        batch_size_of(3)
    with pytest.raises(TypeError, match="batch size of a list"):
        batch_size_of([])


def test_check_labelled() -> None:
    as_source((X, Y)).check_labelled()
    as_source([{"x": X[0]}]).check_labelled()
    with pytest.raises(ValueError, match=r"`data` samples to be .* but got a tuple without labels"):
        as_source((X,)).check_labelled()
    with pytest.raises(ValueError, match=r"`train` samples.*Tensor.*step_fn"):
        DataSource(list(X), name="train").check_labelled()


@pytest.mark.parametrize("shuffle", [True, False])
def test_distributed_sampler_gives_the_global_order_it_shards(shuffle: bool) -> None:
    from torch.utils.data import DistributedSampler

    data = TensorDataset(torch.arange(10).float(), torch.arange(10))
    sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=shuffle, seed=3)
    source = as_source(DataLoader(data, batch_size=4, sampler=sampler))
    for epoch in (0, 1):
        order = source.epoch_order(None, torch.Generator().manual_seed(0), epoch)
        assert sorted(order) == list(range(10))  # every sample once: no padding, no rank's shard only
        sampler.set_epoch(epoch)
        assert list(sampler) == order[1::2]  # what the sampler hands rank 1, before its padding


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        (X.numpy(), Y.numpy()),
        (X.tolist(), Y.tolist()),
        (X, Y.numpy()),
        [X.numpy(), Y.numpy()],
    ],
    ids=["numpy", "lists", "tensor-and-numpy", "list-of-numpy"],
)
def test_arrays_in_place_of_tensors_are_refused_with_the_fix(data: object) -> None:
    with pytest.raises(TypeError, match=r"Expected `data` as tensors \(X, y\).*torch.as_tensor\(X\)"):
        as_source(data)


def test_a_list_of_array_samples_is_still_a_dataset() -> None:
    samples = [np.array([float(i), 1.0]) for i in range(10)]
    assert len(as_source(samples)) == 10


class _Buckets(torch.utils.data.Sampler[list[int]]):
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from ([0, 1], [2, 3])

    def __len__(self) -> int:
        return 2


def test_a_custom_batch_sampler_is_refused_not_dropped() -> None:
    with pytest.raises(ValueError, match=r"batch_sampler is a _Buckets, which chooses the batches itself"):
        as_source(DataLoader(Pairs(), batch_sampler=_Buckets()))


def test_a_loader_without_batching_is_refused() -> None:
    with pytest.raises(ValueError, match=r"batch_size=None.*ready-made batches"):
        as_source(DataLoader(Pairs(), batch_size=None))


def test_a_default_batch_sampler_is_fine() -> None:
    assert len(as_source(DataLoader(Pairs(), batch_size=4, drop_last=True))) == 10


# --- per-micro-batch collation ----------------------------------------------------------------------


def test_each_micro_batch_is_collated_and_padded_on_its_own() -> None:
    dataset = SequenceDataset(20, min_len=4, max_len=40, seed=3)
    source = as_source(DataLoader(dataset, collate_fn=pad_collate))
    step = source.fetch(list(range(8)))
    lengths = [len(dataset.samples[i]) for i in range(8)]
    for start, stop in [(0, 3), (3, 6), (6, 8)]:
        tokens, labels = step.collate(start, stop)
        assert tokens.shape == (stop - start, max(lengths[start:stop]))  # not padded to the step's longest
        assert torch.equal(labels, dataset.labels[start:stop])


def test_largest_label() -> None:
    assert as_source((X, Y)).largest_label() == 9
    assert as_source(Pairs()).largest_label() == 9
    assert as_source((X, X)).largest_label() is None  # float targets: not classes
    tokens = torch.tensor([[1, 5, -100], [2, -100, -100]])
    assert as_source((tokens, tokens)).largest_label() == 5


# -- the mixed case: a padded batch of the longest shape ---------------------------------------------


def test_the_mixed_case_is_the_largest_but_one_and_the_smallest() -> None:
    dataset = SequenceDataset(40, min_len=3, max_len=30, seed=1)
    source = as_source(DataLoader(dataset, collate_fn=pad_collate))
    order = source.largest_first()
    assert source.mixed_indices(5) == [*order[:4], order[-1]]
    tokens, _ = source.mixed_case(5)
    lengths = (tokens != 0).sum(1).tolist()
    assert tokens.shape == (5, len(dataset.samples[order[0]]))  # the longest shape, padded
    assert lengths[-1] == min(len(s) for s in dataset.samples)


def test_there_is_no_mixed_case_where_no_sample_would_be_padded() -> None:
    X, Y = torch.randn(10, 3), torch.arange(10)
    assert as_source((X, Y)).mixed_case(4) is None  # tensors: every sample of one shape
    same = as_source(DataLoader(SequenceDataset(10, min_len=7, max_len=7), collate_fn=pad_collate))
    assert same.mixed_case(4) is None
    varied = as_source(DataLoader(SequenceDataset(10, min_len=2, max_len=9), collate_fn=pad_collate))
    assert varied.mixed_case(1) is None  # one sample: nothing to pad it against
    assert varied.mixed_case(2) is not None


@pytest.mark.parametrize(
    ("size", "error", "got"),
    [("12", TypeError, "'12' (str)"), (torch.ones(3), TypeError, "a tensor of shape (3,) (Tensor)"),
     (float("nan"), ValueError, "nan")],
    ids=["str", "tensor", "nan"],
)  # fmt: skip
def test_a_size_fn_that_returns_no_number_is_refused_naming_it(size: Any, error: type, got: str) -> None:
    source = as_source([(torch.zeros(n), 0) for n in (3, 7, 1)])
    with pytest.raises(error) as caught:
        source.largest_first(lambda sample: size)
    message = str(caught.value)
    assert "Expected `size_fn` to return a" in message and f"returned {got} for sample 0" in message


@pytest.mark.parametrize("size", [7, 7.5, np.float32(7.0), torch.tensor(7), torch.tensor([7.0])])
def test_a_size_fn_may_return_any_kind_of_number(size: Any) -> None:
    source = as_source([(torch.zeros(n), 0) for n in (3, 7, 1)])
    assert source.largest_first(lambda sample: size) == [0, 1, 2]  # all equal: dataset order
