"""The probe: run the real training step at growing batch sizes and find the largest that fits.

Every trial runs :class:`~autobatch.step.Stepper` (the step the training loop runs) on the worst-case
batch of that size, at steady state: one warm-up step first creates the optimizer state, so that Adam's
moments already take their memory while a trial is measured. The search itself is the pure
:func:`~autobatch.search.search`. Whatever happens, the model, optimizer, scaler and random generators
are restored bit for bit before :func:`probe` returns or raises.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from autobatch.cache import ProbeCache, cache_key, fingerprint
from autobatch.data import SizeFn
from autobatch.result import ProbeResult
from autobatch.search import OutOfMemory, Peaks, Trial, search
from autobatch.session import Session
from autobatch.step import LossFn, StepFn
from autobatch.validate import check_positive_int

__all__ = ["ProbeResult", "apply_margin", "probe", "try_batch"]

logger = logging.getLogger(__name__)


def apply_margin(exact: int, margin: float, multiple_of: int) -> int:
    """Shrink the exact maximum by ``margin`` (a fraction) and round it down to ``multiple_of``.

    When no multiple of ``multiple_of`` fits, the batch after the margin is kept (at least 1).

    Example:
        >>> apply_margin(100, 0.1, 8), apply_margin(100, 0.0, 1), apply_margin(5, 0.0, 8)
        (88, 100, 5)
    """
    after_margin = max(1, math.floor(exact * (1.0 - margin)))
    rounded = (after_margin // multiple_of) * multiple_of
    return rounded if rounded >= 1 else after_margin


def probe(
    model: nn.Module,
    data: Any,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
    step_fn: StepFn | None = None,
    precision: str = "auto",
    memory_limit: int | str | None = None,
    device: torch.device | str | None = None,
    max_batch: int | None = None,
    margin: float = 0.0,
    multiple_of: int = 1,
    size_fn: SizeFn | None = None,
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accumulate: bool = True,
    on_trial: Callable[[Trial], None] | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ProbeResult:
    """Find the largest micro-batch whose full training step fits in device memory.

    Args:
        model: the model, on the device to probe (its state is left bit-identical).
        data: a map-style Dataset, a DataLoader (its dataset and collate_fn are used) or tensors ``(X, y)``;
            batches are ``(inputs, targets)`` or dicts for ``model(**batch).loss``.
        optimizer: the optimizer training will use (default: AdamW, lr 1e-3, on the trainable parameters).
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        step_fn: ``step_fn(model, batch) -> loss``, replacing forward and loss.
        precision: ``"auto"`` (fp16 + GradScaler on CUDA, bf16 elsewhere when supported, else fp32),
            ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        memory_limit: bytes or a string such as ``"8GiB"``; on CUDA the allocator is capped to it, on the
            CPU it is the capacity of an emulated device (default: half of the available RAM).
        device: the device to probe; by default the device of the model's parameters.
        max_batch: never return more than this (it is tested before it is returned).
        margin: a fraction of the exact maximum to leave free (0.1 returns 90 % of it).
        multiple_of: round the result down to a multiple of this (8 suits tensor cores).
        size_fn: ``size_fn(sample) -> float`` ranks samples so probe batches hold the largest ones
            (default: the number of elements of the sample's tensors).
        grad_clip: clip the gradient norm during the trial steps, as training will.
        scaler: a GradScaler whose state must be left as it was; the probe steps with its own.
        accumulate: measure a micro-step that adds onto existing gradients, as every micro-step after
            the first of an accumulated batch does (a little more memory); ``False`` when training
            will not accumulate.
        on_trial: called with each :class:`~autobatch.search.Trial` as it completes (progress
            displays; the CLI uses it).
        cache: reuse the result of an earlier probe of the same setup from the on-disk cache, and store
            this one (see :mod:`autobatch.cache`); ``False`` always probes and stores nothing.
        cache_dir: the cache directory (default: ``$AUTOBATCH_CACHE_DIR``, else the user cache
            directory, e.g. ``~/.cache/autobatch``).

    Under torchrun (a process group of several ranks, or torchrun's environment, from which the group is
    then initialised), every rank probes its own copy and the ranks agree after each trial: all ranks
    return the same micro-batch, the one that fits on the tightest rank. A DDP-wrapped model is probed
    through its ``module``.

    Returns:
        A :class:`ProbeResult`; ``micro_batch`` is the batch size to train with.

    Raises:
        NoBatchFitsError: not even one sample fits.
        TypeError, ValueError: a bad argument (the message names it).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        >>> X, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
        >>> result = probe(model, (X, y), memory_limit="2MiB", precision="fp32")
        >>> 1 <= result.micro_batch <= 512
        True
    """
    if max_batch is not None:
        check_positive_int(max_batch, "max_batch")
    check_positive_int(multiple_of, "multiple_of")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < 1.0:
        raise ValueError(f"Expected `margin` to be a fraction in [0, 1), but got {margin!r}.")
    session = Session(
        model,
        data,
        optimizer=optimizer,
        loss_fn=loss_fn,
        step_fn=step_fn,
        precision=precision,
        memory_limit=memory_limit,
        device=device,
        size_fn=size_fn,
        grad_clip=grad_clip,
        scaler=scaler,
        accumulate=accumulate,
    )
    dataset_size = len(session.source)
    cap = min(max_batch or dataset_size, dataset_size)
    if session.group is not None:
        cap = int(session.group.min([cap])[0])
    options = {"max_batch": cap, "margin": margin, "multiple_of": multiple_of, "accumulate": accumulate}
    store = _Store.open(session, cache, cache_dir, options)
    if store is not None and (hit := store.lookup()) is not None:
        logger.info("probe: %s", hit.summary())
        return hit
    started = time.perf_counter()
    outcome = None
    with session.steady_state() as warm:
        if warm:
            outcome = search(
                session.try_step,
                cap=cap,
                limit=session.predict_limit,
                on_trial=on_trial,
                start=session.floor,
                floor=session.floor,
            )
    if outcome is None or outcome.best == 0:
        raise session.nothing_fits()
    best = outcome.best
    micro = apply_margin(best, margin, multiple_of)
    if session.group is not None:  # the searches ran in lockstep; this also covers per-rank options
        micro = int(session.group.min([micro])[0])
    capped_by = None
    if best >= cap:
        capped_by = "max_batch" if max_batch is not None and max_batch <= dataset_size else "dataset"
    result = ProbeResult(
        micro_batch=micro,
        max_fitting_batch=best,
        first_failure=outcome.first_failure,
        capped_by=capped_by,
        device=str(session.device),
        precision=session.precision,
        memory_limit=session.memory.limit,
        limit_kind=session.memory.describe(),
        trials=outcome.trials,
        fixed_bytes=outcome.model.fixed_bytes if outcome.model else None,
        bytes_per_sample=outcome.model.bytes_per_sample if outcome.model else None,
        model_state_bytes=session.model_state_bytes,
        steps=session.steps,
        ooms=sum(not t.fitted for t in outcome.trials),
        margin=float(margin),
        multiple_of=multiple_of,
        seconds=time.perf_counter() - started,
    )
    logger.info("probe: %s", result.summary())
    if store is not None:
        store.save(result)
    return result


def try_batch(model: nn.Module, data: Any, batch_size: int, *, steps: int = 1, **options: Any) -> Trial:
    """Run one steady-state training step at ``batch_size`` and report whether it fitted.

    Takes the options of :func:`probe` (``optimizer``, ``loss_fn``, ``step_fn``, ``precision``,
    ``memory_limit``, ``device``, ``size_fn``, ``grad_clip``, ``scaler``, ``accumulate``) and leaves the
    model untouched in the same way. Useful to check a batch size in CI, or to verify a probe exhaustively.

    Args:
        steps: training steps to run at ``batch_size`` after the warm-up; the trial fits only if all
            of them do, and its peak is the highest of them.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(8, 2)
        >>> X, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
        >>> try_batch(model, (X, y), 64, memory_limit="1MiB", precision="fp32").fitted
        True
    """
    check_positive_int(batch_size, "batch_size")
    check_positive_int(steps, "steps")
    allowed = {
        "optimizer": None, "loss_fn": None, "step_fn": None, "precision": "auto",
        "memory_limit": None, "device": None, "size_fn": None, "grad_clip": None, "scaler": None,
        "accumulate": True,
    }  # fmt: skip
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"try_batch() got unexpected options {unknown}; expected some of {sorted(allowed)}.")
    session = Session(model, data, **{**allowed, **options})
    if batch_size > len(session.source):
        raise ValueError(
            f"Expected `batch_size` to be at most the dataset size {len(session.source)}, "
            f"but got {batch_size}."
        )
    started = time.perf_counter()
    with session.steady_state() as warm:
        if not warm:
            return Trial(batch_size, False, None, time.perf_counter() - started)
        started = time.perf_counter()
        measured: list[Peaks] = []
        try:
            for _ in range(steps):
                measured.append(session.try_step(batch_size))
        except OutOfMemory:
            return Trial(batch_size, False, None, time.perf_counter() - started)
    return Trial(
        batch_size,
        True,
        _highest(p.step_bytes for p in measured),
        time.perf_counter() - started,
        _highest(p.backward_bytes for p in measured),
    )


def _highest(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


class _Store:
    """The probe cache as one probe sees it: rank 0 reads and writes, and tells the other ranks."""

    def __init__(self, session: Session, cache: ProbeCache, fp: dict[str, Any]) -> None:
        self.session, self.cache, self.fingerprint, self.key = session, cache, fp, cache_key(fp)

    @classmethod
    def open(
        cls,
        session: Session,
        cache: bool,
        cache_dir: str | os.PathLike[str] | None,
        options: dict[str, Any],
    ) -> _Store | None:
        if not isinstance(cache, bool):
            raise TypeError(f"Expected `cache` to be a bool, but got {cache!r} ({type(cache).__name__}).")
        if not cache:
            return None
        store = ProbeCache(cache_dir)
        fp = fingerprint(
            model=session.model,
            optimizer=session.optimizer,
            precision=session.precision,
            device=session.device,
            # Under a group the answer depends on the tightest rank's limit, not on this rank's.
            memory_limit=session.predict_limit if session.group is not None else session.memory.limit,
            world_size=session.group.world_size if session.group is not None else 1,
            sample=session.source.worst_case(1, session.size_fn),
            dataset_size=len(session.source),
            options={
                **options,
                "loss_fn": session.stepper.loss_fn,
                "step_fn": session.stepper.step_fn,
                "size_fn": session.size_fn,
                "grad_clip": session.stepper.grad_clip,
            },
        )
        return cls(session, store, fp)

    @property
    def _main(self) -> bool:
        return self.session.group is None or self.session.group.is_main

    def lookup(self) -> ProbeResult | None:
        hit = self.cache.get(self.key) if self._main else None
        if self.session.group is not None:  # every rank takes rank 0's answer, hit or miss
            found = self.session.group.broadcast(hit.to_dict() if hit is not None else None)
            hit = ProbeResult.from_dict(found) if found is not None else None
        return hit

    def save(self, result: ProbeResult) -> None:
        if self._main:
            self.cache.put(self.key, result, self.fingerprint)
