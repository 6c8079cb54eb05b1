"""The exceptions autobatch raises on purpose.

Two families:

* **Usage errors** (:class:`UsageError`): a bad argument, spec or configuration, found before anything
  was changed. :class:`UsageValueError` is also a ``ValueError`` and :class:`UsageTypeError` also a
  ``TypeError``, so ``except ValueError`` keeps working; the command line maps them to exit code 2 by type.
* **Run-time verdicts** (:class:`AutobatchError`): the job cannot go on, for a reason that is not a bug in
  the call itself: nothing fits, an optimizer step ran out of memory half-way, training diverged, the
  evaluation after an epoch failed (the trained result is on the error), another rank failed, or a
  prediction needs what this host cannot give it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line imports this module without torch
    from autobatch.memory.footprint import ModelState
    from autobatch.result import FitResult

__all__ = [
    "AutobatchError",
    "EvaluationError",
    "NoBatchFitsError",
    "NonFiniteLossError",
    "OptimizerStepError",
    "PeerError",
    "PredictionError",
    "UsageError",
    "UsageTypeError",
    "UsageValueError",
]


class UsageError(Exception):
    """Base class of every usage error: an argument, spec or setup that autobatch refuses."""


class UsageValueError(UsageError, ValueError):
    """An argument has the right type but a value autobatch cannot use."""


class UsageTypeError(UsageError, TypeError):
    """An argument has the wrong type."""


class AutobatchError(RuntimeError):
    """Base class of autobatch's run-time verdicts (not usage errors)."""


class NoBatchFitsError(AutobatchError):
    """Not even the smallest micro-batch fits in the device memory available.

    Attributes:
        memory_limit: the limit in bytes the step ran under, or ``None`` when unknown.
        model_state: what the step holds whatever the batch (:class:`~autobatch.memory.footprint.ModelState`:
            ``weights``, ``gradients``, ``optimizer`` in bytes, and ``estimated`` when the optimizer's
            state never existed and was estimated from its kind), when known.
        model_state_bytes: ``model_state.total``, when known.
        needed_bytes: the smallest limit that would do: the peak of one step of the smallest batch,
            measured without the limit (``None`` where there was nothing roomier to measure on).
    """

    def __init__(
        self,
        message: str,
        *,
        memory_limit: int | None = None,
        model_state: ModelState | None = None,
        needed_bytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.memory_limit = memory_limit
        self.model_state = model_state
        self.model_state_bytes = model_state.total if model_state is not None else None
        self.needed_bytes = needed_bytes


class OptimizerStepError(AutobatchError):
    """``optimizer.step()`` ran out of memory after every micro-step of the step had fitted.

    Attributes:
        partial: ``True`` when the failed step had already changed parameters or optimizer state, so that
            it could neither be undone nor repeated; ``False`` when nothing was applied (the step did not
            fit even after the cached memory was released and it was tried once more).
        step: the optimizer step (1-based, counted over the whole fit) that failed.
    """

    def __init__(self, message: str, *, partial: bool, step: int | None = None) -> None:
        super().__init__(message)
        self.partial = partial
        self.step = step


class NonFiniteLossError(AutobatchError):
    """The loss was NaN or infinite for several optimizer steps in a row: training diverged.

    Attributes:
        first_step: the first step of the run of non-finite losses (1-based).
        steps: how many steps in a row had a non-finite loss.
    """

    def __init__(self, message: str, *, first_step: int, steps: int) -> None:
        super().__init__(message)
        self.first_step = first_step
        self.steps = steps


class EvaluationError(AutobatchError):
    """The evaluation after an epoch failed; the epochs trained before it are kept, on :attr:`result`.

    The exception that made it fail is ``__cause__`` (on the other ranks under torchrun, a
    :class:`PeerError` naming the rank where it failed). Fix it and evaluate the trained model, or train on:
    ``result.epochs`` epochs are done.

    Attributes:
        result: the :class:`~autobatch.result.FitResult` so far: losses, plans, back-offs, steps, the
            epochs trained and the evaluations that succeeded.
        epoch: the epoch whose evaluation failed, counted from 0 as in ``EvalReport.epoch``.
    """

    def __init__(self, message: str, *, result: FitResult, epoch: int) -> None:
        super().__init__(message)
        self.result = result
        self.epoch = epoch


class PeerError(AutobatchError):
    """Another rank of the process group failed; every rank stops together instead of waiting forever.

    Attributes:
        ranks: the ranks that failed.
        messages: what each of them raised (``"ValueError: ..."``).
    """

    def __init__(self, message: str, *, ranks: list[int], messages: list[str]) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.messages = messages


class PredictionError(AutobatchError):
    """:func:`autobatch.predict` cannot answer on this host: the step needs real values (control flow on
    activations) and tracing it on real tensors, or the probe it falls back to, needs more host memory than
    there is. The message says why, naming the user's line, and what to do instead."""
