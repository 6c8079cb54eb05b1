"""A probe of a started session: from the probe cache where verification agrees, else a search.

What :func:`autobatch.probe`, :func:`autobatch.fit` and :class:`~autobatch.training.trainstep.TrainStep`
run: open the session's cache entry (rank 0 reads and writes), let the search start from a cached answer
(its two traced steps verify it), store what it found.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence

from autobatch.cache.probestore import ProbeStore
from autobatch.planner import plan
from autobatch.probing.prober import Prober
from autobatch.result import ProbeResult
from autobatch.session import Session

__all__ = ["PLANNED_REPEATS", "planned_chunks", "probe_session"]

logger = logging.getLogger("autobatch.probe")

PLANNED_REPEATS = 4
"""The probe replays and runs a plan's micro-batches of one size at most this many times in a row."""


def planned_chunks(per_rank: int, floor: int) -> Callable[[int], tuple[int, ...]]:
    """``chunks(micro)``: the micro-batches a plan cuts one rank's share of a step into (see
    :func:`_chunks`), what the probe replays for a training loop that knows its target."""
    return functools.partial(_chunks, per_rank, floor)


def _chunks(per_rank: int, floor: int, micro: int) -> tuple[int, ...]:
    """The micro-batches fit's plan cuts one rank's share of a step into, at micro-batch ``micro``: each
    size at most :data:`PLANNED_REPEATS` times in a row (the allocator's state repeats long before; a step
    of a million micro-steps is not run to probe it)."""
    chunks = plan(micro, per_rank, min_chunk=min(floor, per_rank)).chunks
    return tuple(size for size, count in chunks.sizes() for _ in range(min(count, PLANNED_REPEATS)))


def probe_session(
    session: Session, cap: int | None = None, chunks: Callable[[int], Sequence[int]] | None = None
) -> ProbeResult:
    """Probe a started session: from the cache when it holds this setup and verification agrees, else
    by searching (from what verification learned)."""
    prober = Prober(session, chunks)
    dataset = len(session.source)
    cap = min(cap or dataset, session.options.probe.max_batch or dataset, dataset)
    if session.group is not None:
        cap = int(session.group.min([cap])[0])
    with prober.restoring():
        store = ProbeStore.open(prober, cap)  # reads samples: inside the snapshot
        hit = store.lookup() if store is not None else None
        hint = hit.max_fitting_batch if hit is not None and hit.max_fitting_batch <= cap else None
        result = prober.search(cap, hint=hint)
    if hit is not None and result.max_fitting_batch == hit.max_fitting_batch:
        # Trust, but verify: the answer survives, and the memory model its verification recorded
        # predicts no larger one.
        verified = dataclasses.replace(
            hit, verified=True, optimizer_steps=result.optimizer_steps, seconds=result.seconds
        )
        logger.info("probe: %s", verified.summary())
        return verified
    if hit is not None:
        logger.warning(
            "probe: the cached micro-batch %d is %s; probed again: %d",
            hit.max_fitting_batch,
            "too large now" if result.max_fitting_batch < hit.max_fitting_batch else "too small now",
            result.max_fitting_batch,
        )
    logger.info("probe: %s", result.summary())
    if store is not None:
        store.save(result)
    return result
