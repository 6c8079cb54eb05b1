"""The public entry points: :func:`fit`, :func:`probe` and :func:`try_batch`.

Each reads as its stages. Their keyword options are the fields of :mod:`autobatch.options` (the signature
``help()`` shows is written from them): every option has one default, one check and one help text, shared
by all three, the command line, the test kit and the probe cache's key.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from autobatch.errors import EvaluationError, UsageValueError
from autobatch.memory.survival import COLD
from autobatch.options import Options, TrainOptions, entry_point
from autobatch.planner import plan
from autobatch.probing.cached import planned_chunks, probe_session
from autobatch.probing.prober import Prober
from autobatch.probing.search import OutOfMemory, Trial
from autobatch.result import EvalReport, FitResult, ProbeResult
from autobatch.session import Session, resolve
from autobatch.step.stepper import Stepper
from autobatch.training.evaluate import evaluate
from autobatch.training.loop import TrainLoop, warn_batchnorm
from autobatch.validate import check_positive_int

__all__ = ["fit", "probe", "try_batch"]

logger = logging.getLogger("autobatch.fit")


@entry_point("fit")
def fit(
    model: nn.Module, data: Any, target_batch: int = TrainOptions.target_batch, **options: Any
) -> FitResult:
    """Train ``model`` with an effective batch of exactly ``target_batch``, whatever the device holds.

    Probes the largest micro-batch that fits, plans gradient accumulation so that micro-batches add up
    to ``target_batch``, trains with autocast and a GradScaler, backs off and redoes a step that runs
    out of memory, and scores ``eval_data`` with sklearn's ``classification_report`` after each epoch.

    Args:
        model: the model; moved to ``device`` (nothing is changed when an argument is refused).
        data: a map-style Dataset, a DataLoader (its dataset, collate_fn, sampler and worker settings
            are kept, its batch size is not) or tensors ``(X, y)``. Batches are ``(*inputs, targets)``
            or dicts passed as ``model(**batch)`` whose output has ``.loss``.
        target_batch: the effective batch of every optimizer step, over all ranks.

    Returns:
        A :class:`~autobatch.result.FitResult`.

    Raises:
        UsageTypeError, UsageValueError: a bad argument, named in the message; nothing was changed.
        NoBatchFitsError: not even the smallest micro-batch fits.
        OptimizerStepError: ``optimizer.step()`` ran out of memory after every micro-step fitted.
        NonFiniteLossError: the loss was NaN or infinite for several steps in a row.
        EvaluationError: the evaluation after an epoch failed; ``.result`` is the FitResult so far and
            ``__cause__`` what failed.

    Example:
        >>> import torch, autobatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        >>> X, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
        >>> result = autobatch.fit(model, (X, y), target_batch=32, memory_limit="256KiB",
        ...                        device="cpu", precision="fp32", seed=0, progress=False)
        >>> result.plan.effective_batch, result.samples
        (32, 96)
    """
    started = time.perf_counter()
    session = resolve(model, data, Options.parse("fit", {"target_batch": target_batch, **options}))
    train = session.options.train
    with session.start():
        per_rank = train.target_batch // session.world_size
        probed = (
            probe_session(session, cap=per_rank, chunks=planned_chunks(per_rank, session.floor))
            if train.micro_batch is None
            else None
        )
        micro = probed.micro_batch if probed is not None else train.micro_batch
        assert micro is not None
        initial = plan(micro, train.target_batch, session.world_size, min_chunk=session.floor)
        if session.is_main:
            logger.info("plan: %s", initial.describe())
            warn_batchnorm(session.model, initial)
        fixed = probed.fixed_bytes if probed is not None else None
        loop = TrainLoop(session, _training_stepper(session), micro, fixed)
        result = FitResult(probe=probed, plan=initial, final_plan=initial)
        # Training starts cold (the probe left the allocator empty) and its memory carries from step to
        # step, as a GPU's does: what the probe's replay of training assumed.
        with session.memory.capped(), session.memory.carried():
            for epoch in range(train.epochs):
                t0 = time.perf_counter()
                result.losses += loop.run_epoch(epoch, train.epochs)
                result.train_seconds += time.perf_counter() - t0
                result.epochs = epoch + 1
                if session.eval_source is not None:
                    result.evals.append(_evaluate(session, loop, result, epoch, started))
                    session.memory.empty_cache()  # evaluation's cached blocks are not training's
    _record(result, session, loop, started)
    return result


def _record(result: FitResult, session: Session, loop: TrainLoop, started: float) -> None:
    """Put what training did into ``result``: at the end, or when an evaluation fails."""
    result.final_plan = loop.plan
    result.skipped_steps, result.nonfinite_steps = loop.skipped_steps, loop.nonfinite_steps
    result.backoffs, result.regrowths = loop.backoffs, loop.regrowths
    result.optimizer_steps, result.samples = loop.steps, loop.samples
    result.cpu_threads = session.cpu_threads
    result.seconds = time.perf_counter() - started


def _training_stepper(session: Session) -> Stepper:
    step = session.options.step
    assert session.optimizer is not None  # built by Session.start
    return Stepper(
        session.model,
        session.optimizer,
        session.memory,
        session.precision,
        forward=session.ddp,  # under DDP the forward runs through the wrapper (inside its no_sync())
        loss_fn=step.loss_fn,
        step_fn=step.step_fn,
        grad_clip=step.grad_clip,
    )


def _evaluate(session: Session, loop: TrainLoop, result: FitResult, epoch: int, started: float) -> EvalReport:
    """Evaluate after ``epoch``; if that fails, the :class:`EvaluationError` carries ``result``.

    The first evaluation starts from the user's ``eval_batch``, else from a measured batch of the
    training micro-batch's size and then the largest the memory model says fits; later ones start from
    the batch that fitted last time.
    """
    evaluation = session.options.eval
    assert session.eval_source is not None
    given = None if result.evals else evaluation.eval_batch
    try:
        report = evaluate(
            session.model,
            session.eval_source,
            session.memory,
            loop.stepper.autocast,
            batch_size=result.evals[-1].batch_size if result.evals else given,
            first_batch=loop.micro,
            target_names=evaluation.target_names,
            predict_fn=evaluation.predict_fn,
            kind=session.eval_kind,
            epoch=epoch,
            group=session.group,
        )
    except Exception as exc:  # agreed across ranks inside evaluate: every rank raises here
        _record(result, session, loop, started)
        epochs = session.options.train.epochs
        done = f"{result.optimizer_steps} optimizer step{'s' if result.optimizer_steps != 1 else ''}"
        trained = (
            f"Training finished ({epochs} epoch{'s' if epochs != 1 else ''}, {done})"
            if epoch + 1 == epochs
            else f"Training stopped after epoch {epoch + 1} of {epochs} ({done})"
        )
        cause = str(exc).rstrip().removesuffix(".")
        raise EvaluationError(
            f"{trained}, but the evaluation after epoch {epoch + 1} failed: {type(exc).__name__}: {cause}. "
            "The model keeps what it learned, and the FitResult so far is on this error: "
            "`except autobatch.EvaluationError as error: result = error.result`.",
            result=result,
            epoch=epoch,
        ) from exc
    if given is not None and report.backoffs:
        logger.warning(
            "eval_batch=%d does not fit: evaluation backed off to %d. Lower `eval_batch`, or leave it out "
            "to start from what the memory model says fits.",
            given,
            report.batch_size,
        )
    logger.info("epoch %d: %s evaluation, %s", epoch + 1, report.kind, report.headline())
    return report


@entry_point("probe")
def probe(model: nn.Module, data: Any, **options: Any) -> ProbeResult:
    """Find the largest micro-batch whose full training step fits in device memory.

    Every trial is the real training step (autocast forward, loss, scaled backward, optimizer step) at
    steady state, on a batch of the largest samples; the model, optimizer, scaler and generators are
    left bit-identical. Under torchrun every rank probes its own copy and the ranks agree after each
    trial: all return the micro-batch that fits on the tightest rank.

    Args:
        model: the model, on the device to probe (a DDP wrapper is probed through its ``module``).
        data: a map-style Dataset, a DataLoader (its dataset and collate_fn are used) or tensors ``(X, y)``.

    Returns:
        A :class:`~autobatch.result.ProbeResult`; ``micro_batch`` is the batch size to train with.

    Raises:
        UsageTypeError, UsageValueError: a bad argument (the message names it).
        NoBatchFitsError: not even the smallest batch fits.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        >>> X, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
        >>> result = probe(model, (X, y), memory_limit="2MiB", precision="fp32")
        >>> 1 <= result.micro_batch <= 512
        True
    """
    session = resolve(model, data, Options.parse("probe", options))
    with session.start():
        return probe_session(session)


@entry_point("try_batch")
def try_batch(
    model: nn.Module, data: Any, batch_size: int, *, steps: int | None = None, **options: Any
) -> Trial:
    """Tell whether training at ``batch_size`` survives, as the probe defines it, and its peak.

    Training survives when it runs from a cold start (weights only: the first step makes the gradients and
    the optimizer state among the activations) and from steady state, over consecutive steps with the
    allocator's cache carried from each to the next, until the allocator's state repeats
    (:mod:`autobatch.memory.survival`): the first two steps from a cold start run for real, the rest are
    replayed from their exact timeline and the step with the least room runs for real too. The probe's
    answer is the largest batch for which this holds. Leaves the model untouched as :func:`probe` does.
    Useful to check a batch size in CI, or to verify a probe exhaustively.

    Args:
        model: the model, on the device to test.
        data: as for :func:`probe`; the batch holds its ``batch_size`` largest samples. Where samples
            differ in size, a padded batch of that size (the largest but one, with the smallest) must fit
            too, as in the probe.
        batch_size: the batch to try.
        steps: also run this many consecutive steps from a cold start for real (beyond the two that
            always run); the trial fits only if all of them do, and its peak is the highest of them.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(8, 2)
        >>> X, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
        >>> try_batch(model, (X, y), 64, memory_limit="1MiB", precision="fp32").fitted
        True
    """
    check_positive_int(batch_size, "batch_size")
    if steps is not None:
        check_positive_int(steps, "steps")
    session = resolve(model, data, Options.parse("try_batch", options))
    if batch_size > len(session.source):
        raise UsageValueError(
            f"Expected `batch_size` to be at most the dataset size {len(session.source)}, "
            f"but got {batch_size}."
        )
    started = time.perf_counter()
    with session.start():
        prober = Prober(session)
        with prober.restoring():
            try:
                verdict = prober.survives(batch_size)
                peaks = [verdict.peaks]
                if steps is not None and steps > 2:  # more consecutive steps from a cold start, for real
                    with prober.memory.capped():
                        peaks.append(prober.trials.run_for_real(batch_size, "longest", COLD, steps))
            except OutOfMemory:
                return Trial(batch_size, False, None, time.perf_counter() - started)
    survival = verdict.survival
    replayed = survival.peak if survival is not None and prober.memory.emulated else None

    def highest(*values: int | None) -> int | None:
        known = [v for v in values if v is not None]
        return max(known) if known else None

    return Trial(
        batch_size,
        True,
        highest(*(p.step_bytes for p in peaks), replayed),
        time.perf_counter() - started,
        highest(*(p.backward_bytes for p in peaks)),
        highest(*(p.reserved_bytes for p in peaks), replayed if prober.memory.counts_reserved else None),
    )
