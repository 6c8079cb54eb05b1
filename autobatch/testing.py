"""Assertions for CI smoke tests on small devices: :func:`assert_fits` and :func:`assert_trains`.

They fail with plain ``AssertionError`` messages that give the numbers (peak against limit, the largest
batch that fits), so they work in any test runner. With pytest, autobatch's plugin
(the ``pytest_autobatch`` module) adds ``@pytest.mark.memory_limit("4GiB")`` (or ``(gpu="T4")``, and
``predict=True``), whose device they use when given none, the ``memory_limit`` fixture (a
:class:`DeviceLimit`) and a ``gpu`` marker. ``assert_fits(..., predict=True)`` answers from
:func:`autobatch.predict` instead of running the steps: a CPU-only runner checks a real card in seconds.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

import autobatch
from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.memory.device import resolve_memory_limit
from autobatch.options import Options
from autobatch.session import resolve
from autobatch.step.data import DataSource, as_source
from autobatch.units import format_bytes
from autobatch.validate import check_positive_int

__all__ = ["DeviceLimit", "assert_fits", "assert_trains", "device_scope"]


@dataclass(frozen=True)
class DeviceLimit:
    """The device a ``memory_limit``-marked test runs as.

    Attributes:
        limit: the limit in bytes (with ``gpu``: what the card's caching allocator may reserve).
        device: the device autobatch trains on by default in the test.
        emulated: ``True`` where autobatch emulates the device (the CPU), ``False`` where CUDA's caching
            allocator is capped.
        gpu: the card the test runs as (``None``: a device of ``limit``).
        predict: whether :func:`assert_fits` predicts rather than runs the steps.

    Example:
        >>> str(DeviceLimit(4 * 2**30, torch.device("cpu"), emulated=True))
        '4.00 GiB (emulated on cpu)'
    """

    limit: int
    device: torch.device
    emulated: bool
    gpu: str | None = None
    predict: bool = False

    def __str__(self) -> str:
        return self._describe()

    def _describe(self, precision: str | None = None) -> str:
        if self.predict:
            where = f"a {self.gpu}'s caching allocator" if self.gpu else "an emulated device"
            return f"{format_bytes(self.limit)} of {where} (predicted" + (
                f", {precision})" if precision else ")"
            )
        how = "emulated on" if self.emulated else "allocator cap on"
        card = f"a {self.gpu}: " if self.gpu else ""
        return f"{card}{format_bytes(self.limit)} ({how} {self.device}" + (
            f", {precision})" if precision else ")"
        )

    @classmethod
    def on(
        cls, limit: int, device: torch.device, *, gpu: str | None = None, predict: bool = False
    ) -> DeviceLimit:
        """The limit on ``device``: emulated everywhere but on CUDA, whose allocator is capped."""
        return cls(limit, device, emulated=device.type != "cuda", gpu=gpu, predict=predict)


_SCOPE: ContextVar[DeviceLimit | None] = ContextVar("autobatch_device_limit", default=None)


@contextlib.contextmanager
def device_scope(device: DeviceLimit) -> Iterator[DeviceLimit]:
    """Inside the block, :func:`assert_fits` predicts when ``device.predict`` is set, for ``device.gpu``
    (the pytest plugin's marker enters it; scopes nest, the innermost wins)."""
    token = _SCOPE.set(device)
    try:
        yield device
    finally:
        _SCOPE.reset(token)


# -- assertions ------------------------------------------------------------------------------------


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (bool, int, float)):
        return torch.tensor(value)
    raise UsageTypeError(f"Expected `{where}` to be a tensor or a number, but got {type(value).__name__}.")


def _repeat(sample: Any, n: int) -> Any:
    """A dataset of ``n`` copies of ``sample``: expanded tensors ``(X, ..., y)`` or a list of dicts."""
    if isinstance(sample, Mapping) and sample:
        for key, value in sample.items():
            _as_tensor(value, f"sample[{key!r}]")
        return [dict(sample)] * n  # a list is a map-style dataset; the default collate stacks dicts
    if isinstance(sample, (tuple, list)) and sample:
        tensors = [_as_tensor(v, f"sample[{i}]") for i, v in enumerate(sample)]
        return tuple(t.unsqueeze(0).expand(n, *t.shape) for t in tensors)  # n views, no copies
    raise UsageTypeError(
        "Expected `sample` to be one training sample: a non-empty tuple (inputs..., target) or a dict of "
        f"per-sample tensors, but got {type(sample).__name__}; wrap a lone tensor as (x,) with a step_fn."
    )


def _estimated_peak(result: autobatch.ProbeResult, batch: int) -> float | None:
    """The failing batch's peak from the probe's memory model, else a line through its fitted trials."""
    if result.bytes_per_sample and result.fixed_bytes is not None:
        return result.fixed_bytes + result.bytes_per_sample * batch
    peaks = sorted((t.batch, t.backward_peak_bytes or t.peak_bytes) for t in result.trials if t.fitted)
    points = [(b, p) for b, p in peaks if p is not None]
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    (b0, p0), (b1, p1) = points[0], points[-1]
    slope = (p1 - p0) / (b1 - b0)
    return p1 + slope * (batch - b1) if slope > 0 else None


def assert_fits(
    model: nn.Module,
    sample: Any,
    batch_size: int,
    *,
    memory_limit: int | str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    precision: str = "auto",
    steps: int | None = None,
    predict: bool | None = None,
    gpu: str | None = None,
    **options: Any,
) -> autobatch.Trial:
    """Assert that training at ``batch_size`` survives in ``memory_limit``, as the probe defines it: from a
    cold start and from steady state, over consecutive steps with the allocator's cache carried.

    Args:
        model: the model, on the device to test.
        sample: one training sample: a tuple ``(inputs..., target)`` of tensors or numbers, or a dict of
            per-sample tensors (``model(**batch).loss``); the batch repeats it ``batch_size`` times.
        batch_size: the micro-batch to check.
        memory_limit: bytes or e.g. ``"4GiB"``; default: the test's ``@pytest.mark.memory_limit``.
        optimizer, precision, options: as for :func:`autobatch.try_batch` (``loss_fn``, ``step_fn``, …).
        steps: also run this many consecutive steps from a cold start for real (see
            :func:`autobatch.try_batch`).
        predict: answer from :func:`autobatch.predict` (fake tensors: nothing at full size runs) instead;
            then every micro-batch up to ``batch_size`` must survive, as a plan's varying ones need.
            Default: the test's marker's ``predict``, else ``False``.
        gpu: with ``predict``, the card to predict for (``"T4"``, ``"A100-80GB"``, ...); default: the
            marker's.

    Returns:
        The :class:`autobatch.Trial` (``.peak_bytes`` is the measured peak; predicted, the replayed one).

    Raises:
        AssertionError: the steps ran out of memory; the message gives the estimated peak against the
            limit and the largest batch that fits.
        TypeError, ValueError: a bad argument, or no limit at all.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        >>> sample = (torch.randn(32), 3)
        >>> assert_fits(model, sample, 64, memory_limit="64KiB", precision="fp32")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        AssertionError: batch 64 does not fit in 64.00 KiB (emulated on cpu, fp32): estimated peak ...
    """
    __tracebackhide__ = True  # pytest shows the AssertionError at the caller, not in here
    check_positive_int(batch_size, "batch_size")
    if steps is not None:
        check_positive_int(steps, "steps")
    scope = _SCOPE.get()
    predict = (scope is not None and scope.predict) if predict is None else predict
    if predict:
        if steps is not None:
            raise UsageValueError(
                "Expected no `steps` with `predict=True`: a prediction replays consecutive steps until the "
                "allocator's state repeats, and runs none for real. Drop steps, or pass predict=False."
            )
        gpu = gpu if gpu is not None else (scope.gpu if scope is not None else None)
        options = {"optimizer": optimizer, "precision": precision, "gpu": gpu, **options}
        return _predicted_fit(model, sample, batch_size, memory_limit, options)
    if gpu is not None:
        raise UsageValueError(
            f"Expected `predict=True` with `gpu={gpu!r}`: the card is what a prediction is made for; this "
            "machine runs the steps on its own device otherwise."
        )
    data = _repeat(sample, batch_size)
    limit = resolve_memory_limit(memory_limit)
    if limit is None:
        raise UsageTypeError(
            "assert_fits() needs a memory limit: pass memory_limit='4GiB' or mark the test with "
            "@pytest.mark.memory_limit('4GiB')."
        )
    options = {"optimizer": optimizer, "precision": precision, "memory_limit": limit, **options}
    trial = autobatch.try_batch(model, data, batch_size, steps=steps, **options)
    if trial.fitted:
        return trial
    where = _where("try_batch", model, data, options, limit)
    try:
        result = autobatch.probe(model, data, max_batch=batch_size, cache=False, **options)
    except autobatch.NoBatchFitsError:
        raise AssertionError(
            f"batch {batch_size} does not fit in {where}: not even a batch of 1 fits "
            "(largest batch that fits: none)"
        ) from None
    estimate = _estimated_peak(result, batch_size)
    if estimate is not None and estimate > limit:
        peak = f"estimated peak {format_bytes(estimate)} vs limit {format_bytes(limit)}"
    else:
        peak = f"peak over the limit of {format_bytes(limit)}"
    best = result.max_fitting_batch
    best_peak = max((t.peak_bytes or 0 for t in result.trials if t.fitted and t.batch == best), default=0)
    fits = f"largest batch that fits: {best}" + (f" (peak {format_bytes(best_peak)})" if best_peak else "")
    if best >= batch_size:
        fits += " for one step, but not over consecutive steps (memory grows from step to step)"
    elif result.decided_by is not None:
        fits += f", decided by {result.decided_by}"
    raise AssertionError(f"batch {batch_size} does not fit in {where}: {peak}; {fits}")


def _predicted_fit(
    model: nn.Module, sample: Any, batch_size: int, memory_limit: int | str | None, options: dict[str, Any]
) -> autobatch.Trial:
    """:func:`assert_fits` from a prediction: every micro-batch up to ``batch_size`` survives."""
    __tracebackhide__ = True
    data = _repeat(sample, max(batch_size, 4))  # the traced steps need a few samples
    if options["gpu"] is None and resolve_memory_limit(memory_limit) is None:
        raise UsageTypeError(
            "assert_fits(predict=True) needs a card or a memory limit: pass gpu='T4' or memory_limit='4GiB', "
            "or mark the test with @pytest.mark.memory_limit(gpu='T4', predict=True)."
        )
    try:
        result = autobatch.predict(model, data, memory_limit=memory_limit, max_batch=batch_size, **options)
    except autobatch.NoBatchFitsError as exc:
        raise AssertionError(f"batch {batch_size} does not fit (predicted): {exc}") from None
    where = DeviceLimit(
        result.budget_bytes or 0, torch.device(result.device), emulated=result.gpu is None, gpu=result.gpu,
        predict=True,
    )._describe(result.precision)  # fmt: skip
    best = result.max_fitting_batch
    if best < batch_size:
        decided = f", decided by {result.decided_by}" if result.decided_by else ""
        raise AssertionError(
            f"batch {batch_size} does not fit in {where}: largest batch that fits: {best}{decided}"
        )
    peak = None
    if (
        result.fixed_bytes is not None and result.bytes_per_sample is not None
    ):  # the replay's line: exact here
        peak = round(result.fixed_bytes + result.bytes_per_sample * batch_size)
    reserved = peak if result.alloc_conf is not None else None
    return autobatch.Trial(batch_size, True, peak, result.seconds, None, reserved)


def _where(entry: str, model: nn.Module, data: Any, options: dict[str, Any], limit: int) -> str:
    """The device as the call saw it, for messages: ``'4.00 GiB (emulated on cpu, bf16)'``."""
    session = resolve(model, data, Options.parse(entry, {**options, "memory_limit": limit}))
    return DeviceLimit.on(limit, session.device)._describe(session.precision)


def _first_samples(data: Any, n: int) -> Any:
    """The first ``n`` samples of ``data`` in a form :func:`autobatch.fit` takes."""
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(t[:n] for t in data)
    source = as_source(data)
    if n >= len(source):
        return source
    # A DataLoader's sampler spans the whole dataset: the subset keeps its collate and worker settings only.
    return DataSource(
        Subset(source.dataset, range(n)), collate_fn=source.collate_fn, loader_kwargs=source.loader_kwargs
    )


def assert_trains(
    model: nn.Module,
    data: Any,
    target_batch: int,
    *,
    memory_limit: int | str | None = None,
    steps: int | None = 2,
    **fit_options: Any,
) -> autobatch.FitResult:
    """Assert that a short :func:`autobatch.fit` (probe, plan, ``steps`` optimizer steps) finishes cleanly.

    Args:
        model: the model (moved to the training device, as by ``fit``).
        data: a Dataset, a DataLoader or tensors ``(X, y)``; only the first ``steps × target_batch``
            samples are used (all of them when ``steps`` is ``None``).
        target_batch: the effective batch of each optimizer step.
        memory_limit: bytes or e.g. ``"4GiB"``; default: the test's ``@pytest.mark.memory_limit``.
        steps: optimizer steps to train.
        fit_options: passed to :func:`autobatch.fit` (default ``epochs=1``, ``progress=False`` and
            ``cache=False``: a test measures, it never reuses an earlier probe).

    Returns:
        The :class:`autobatch.FitResult`.

    Raises:
        AssertionError: nothing fits in the limit, or the final loss is not finite. Other errors
            propagate unchanged.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        >>> X, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
        >>> result = assert_trains(model, (X, y), 32, memory_limit="64KiB", device="cpu", precision="fp32")
        >>> result.optimizer_steps
        2
    """
    __tracebackhide__ = True
    check_positive_int(target_batch, "target_batch")
    if steps is not None:
        check_positive_int(steps, "steps")
    limit = resolve_memory_limit(memory_limit)
    if limit is None:
        raise UsageTypeError(
            "assert_trains() needs a memory limit: pass memory_limit='4GiB' or mark the test with "
            "@pytest.mark.memory_limit('4GiB')."
        )
    subset = data if steps is None else _first_samples(data, steps * target_batch)
    options = {"epochs": 1, "progress": False, "cache": False, **fit_options}
    try:
        result = autobatch.fit(model, subset, target_batch, memory_limit=limit, **options)
    except autobatch.NoBatchFitsError as exc:
        where = _where("fit", model, subset, {**options, "target_batch": target_batch}, limit)
        raise AssertionError(f"nothing fits in {where}: {exc}") from exc
    if result.losses and not math.isfinite(result.losses[-1]):
        first = next(i for i, loss in enumerate(result.losses) if not math.isfinite(loss))
        raise AssertionError(
            f"training diverged: loss {result.losses[first]} at step {first + 1} of {len(result.losses)}"
        )
    return result
