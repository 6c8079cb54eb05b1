"""Does a micro-batch survive training? A step's timeline replayed over consecutive steps.

A probe's trial measures one step. Training runs many, and the allocator's cache carries from each to the
next: the first backward places the gradients between activations, the first ``optimizer.step()`` places
the optimizer state in whatever blocks are free, and every later step allocates around what the steps before
left. A micro-batch *fits* when training at it survives two ways of starting:

* **cold start**: the weights resident (packed, as after ``model.to(device)``), no gradients, no optimizer
  state; the first step makes them (what ``fit``, an exported config and every later run start from);
* **steady state**: weights and optimizer state resident, packed (a run resumed from a checkpoint, and what
  each of the probe's trials used to start from);

each followed by consecutive steps until the allocator's state at a step boundary repeats (its fixed point:
every later step repeats one already replayed) or :data:`MAX_STEPS` steps.

A step is a :class:`StepModel`: the micro-steps' allocations, linear in the batch (a
:class:`~autobatch.memory.timeline.MemoryTimeline` cut at the step's marks), then the optimizer step's, which
do not depend on the batch: the first time (making the state) and at steady state. Its micro-steps can be
replayed at the sizes a plan gives them (``11 + 11 + 10``). Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from autobatch.memory.alloc_conf import AllocatorConfig
from autobatch.memory.allocator import AllocatorOutOfMemory, CachingAllocator
from autobatch.memory.timeline import SCAN_LIMIT, MemoryTimeline, Timeline, best_fit, largest_in_regions

__all__ = [
    "COLD",
    "MAX_STEPS",
    "SCAN_BUDGET",
    "STEADY",
    "StepModel",
    "StepReplay",
    "Survival",
    "SurvivalPredictor",
    "fit_step_model",
    "prefix",
    "survive",
]

MAX_STEPS = 32
"""Consecutive steps replayed at most per way of starting, when no fixed point comes first."""

SCAN_BUDGET = 256
"""Batches below a predicted maximum replayed at most to look for holes (each replay is a few steps)."""

COLD, STEADY = "cold start", "steady state"
"""The two ways a training run starts (see the module's docs)."""

DEFAULT_CONFIG = AllocatorConfig()
_BLOCK = 512
_SMALL = 1 << 20  # the largest block of the small pool
Event = tuple[Any, ...]


@dataclass(frozen=True)
class StepReplay:
    """One replayed training step: how it started, its place in the run, its peak and whether it fitted."""

    start: str
    step: int
    peak: int
    fitted: bool

    def describe(self) -> str:
        return f"step {self.step} from a {self.start}"


@dataclass(frozen=True)
class Survival:
    """What training at one micro-batch does over consecutive steps.

    Attributes:
        fits: every replayed step fitted, from both starts.
        steps: every replayed step, in order.
        failure: the first step that ran out of memory (``None`` when all fitted).
        binding: the step that fitted with the least room (the highest peak).
        fixed_point: per start, the step after which the allocator's state repeats (``None``: no fixed
            point within :data:`MAX_STEPS`, memory changing from step to step).
        growth: bytes held more after each step at the end of the replay (a step that keeps what it
            made: a leak), 0 when memory is steady.
    """

    fits: bool
    steps: tuple[StepReplay, ...]
    failure: StepReplay | None
    binding: StepReplay | None
    fixed_point: dict[str, int | None] = field(default_factory=dict)
    growth: int = 0

    @property
    def peak(self) -> int:
        """The highest peak over the steps that fitted (reserved bytes, or live bytes on an ideal device)."""
        return max((s.peak for s in self.steps if s.fitted), default=0)


@dataclass(frozen=True)
class StepModel:
    """A training step's allocations as a function of its micro-batches (see the module's docs).

    Attributes:
        micro: the micro-steps' events up to the optimizer step, linear in the batch.
        cold_optimizer: the optimizer step's events the first time (it makes the optimizer state).
        warm_optimizer: the optimizer step's events at steady state.
        weights: what a cold start holds (in allocation order): parameters, buffers, what modules keep.
        warm_resident: what a step at steady state starts with: the weights, then the optimizer state.
    """

    micro: MemoryTimeline
    cold_optimizer: tuple[Event, ...]
    warm_optimizer: tuple[Event, ...]
    weights: tuple[int, ...]
    warm_resident: tuple[int, ...]

    def step_events(self, batch: int, *, cold: bool, chunks: Sequence[int] | None = None) -> list[Event]:
        """One step's events (ids local to the step), its micro-steps at ``chunks`` (default: as traced)."""
        blocks = self.step_blocks(batch, cold=cold, chunks=chunks)
        events: list[Event] = []
        for n, (block, count) in enumerate(blocks):
            later = 0 < n < len(blocks) - 1  # a run of later micro-steps: fresh ids each time
            for r in range(count):
                events += [_renamed(e, (n, r)) for e in block] if later else block
        return events

    def step_blocks(
        self, batch: int, *, cold: bool, chunks: Sequence[int] | None = None
    ) -> list[tuple[list[Event], int]]:
        """One step as blocks of events and how many times each runs in a row: the micro-steps as traced,
        or the first micro-step, then each run of later ones of one size (repeated) where ``chunks`` says
        so; then the optimizer step. A repeated block frees only what it allocated."""
        optimizer = list(self.cold_optimizer if cold else self.warm_optimizer)
        traced = self.micro.step_events(batch)
        marks = [i for i, e in enumerate(traced) if e == ("mark", "micro")]
        if chunks is None or not self.repeatable or (len(chunks) == len(marks) and set(chunks) == {batch}):
            return [(traced + optimizer, 1)]
        blocks: list[tuple[list[Event], int]] = [(self.micro.step_events(chunks[0])[: marks[1]], 1)]
        for size, count in _runs(chunks[1:]):
            blocks.append((self.micro.step_events(size)[marks[1] :], count))
        return [*blocks, (optimizer, 1)]

    @property
    def repeatable(self) -> bool:
        """Whether the second micro-step can stand for every later one: it frees only what it allocated,
        and all of it (so a plan's micro-steps can be replayed at their own sizes)."""
        skeleton = self.micro.skeleton
        marks = [i for i, e in enumerate(skeleton) if e == ("mark", "micro")]
        if len(marks) != 2:
            return False
        later = skeleton[marks[1] :]
        made = {e[1] for e in later if e[0] == "alloc"}
        freed = [e[1] for e in later if e[0] == "free"]
        return set(freed) == made and len(freed) == len(made)


def _runs(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[(size, how many in a row), ...]``."""
    runs: list[tuple[int, int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1] = (size, runs[-1][1] + 1)
        else:
            runs.append((size, 1))
    return runs


def _renamed(event: Event, where: Any) -> Event:
    """An event of a block's repetition, its ids made unique (residents keep theirs)."""
    if event[0] == "alloc":
        return ("alloc", (where, event[1]), event[2])
    if event[0] == "free" and not (isinstance(event[1], tuple) and event[1][0] == "resident"):
        return ("free", (where, event[1]))
    return event


def _split(timeline: Timeline) -> tuple[tuple[Event, ...], tuple[Event, ...]] | None:
    """A traced step cut at its optimizer-step mark: (micro-steps, optimizer step); ``None`` without one."""
    marks = [i for i, e in enumerate(timeline.events) if e == ("mark", "optimizer")]
    if len(marks) != 1:
        return None
    return timeline.events[: marks[0]], timeline.events[marks[0] :]


def fit_step_model(
    cold: Timeline,
    warm: Sequence[Timeline],
    *,
    cold_micro: bool = True,
    more: Sequence[Timeline] = (),
) -> StepModel | None:
    """The model of a training step from the trace of a cold step and traces of steady ones.

    The micro-steps run the same code whether or not the optimizer state exists, so their allocations
    line up across all the traces: the two largest batches that line up give the line (one batch alone
    gives that batch's sizes). The optimizer step's events come from the cold trace and from the largest
    warm one. With ``cold_micro=False`` the cold trace (of other batches: the longest samples, for a
    padded case) gives only its optimizer step; ``more`` traces (other cold steps) give their micro-steps.
    ``None`` when the traces do not line up that way.
    """
    cold_parts = _split(cold)
    warm_parts = [(t, parts) for t in warm if (parts := _split(t)) is not None]
    if cold_parts is None or not warm_parts:
        return None
    micro = [Timeline(t.batch, cold.resident, p[0]) for t, p in warm_parts if p is not None]
    if cold_micro:
        micro.insert(0, Timeline(cold.batch, cold.resident, cold_parts[0]))
    for extra in more:
        parts = _split(extra)
        if parts is not None:
            micro.append(Timeline(extra.batch, cold.resident, parts[0]))
    model = best_fit(micro) or _one_batch(micro)
    if model is None:
        return None
    held = _held(model)
    largest, largest_parts = max(warm_parts, key=lambda item: item[0].batch)
    cold_optimizer = _attached(cold_parts, held)
    warm_optimizer = _attached(largest_parts, held)
    weights = cold.resident
    # The micro-steps free no optimizer state: a cold step has none (every free of a resident must name a
    # weight), and a weight is where the warm traces have it (the weights come first).
    if (
        cold_optimizer is None
        or warm_optimizer is None
        or largest.resident[: len(weights)] != weights
        or any(e[0] == "free" and isinstance(e[1], tuple) and e[1][1] >= len(weights) for e in model.skeleton)
    ):
        return None
    return StepModel(model, cold_optimizer, warm_optimizer, weights, largest.resident)


def _held(model: MemoryTimeline) -> list[tuple[Any, int]] | None:
    """What the micro-steps leave for the optimizer step (the gradients, the summed loss), in allocation
    order, with their sizes; ``None`` where a size depends on the batch."""
    sizes = dict(zip((e[1] for e in model.skeleton if e[0] == "alloc"), model.sizes, strict=True))
    freed = {e[1] for e in model.skeleton if e[0] == "free"}
    held = [(key, pair) for key, pair in sizes.items() if key not in freed]
    if any(a != b for _, (a, b) in held):
        return None
    return [(key, a) for key, (a, _) in held]


def _attached(
    parts: tuple[tuple[Event, ...], tuple[Event, ...]], held: list[tuple[Any, int]] | None
) -> tuple[Event, ...] | None:
    """A trace's optimizer step, its references to what its micro-steps left pointed at the model's
    (matched in allocation order, size for size): the same gradients, whichever trace it came from.
    ``None`` where they do not match."""
    micro, optimizer = parts
    freed = {e[1] for e in micro if e[0] == "free"}
    left = [(e[1], e[2]) for e in micro if e[0] == "alloc" and e[1] not in freed]
    if held is None or [size for _, size in left] != [size for _, size in held]:
        return None
    target = {key: model_key for (key, _), (model_key, _) in zip(left, held, strict=True)}
    own: set[Any] = set()
    out: list[Event] = []
    for event in optimizer:
        if event[0] == "alloc":
            own.add(event[1])
            out.append(("alloc", ("optimizer", event[1]), event[2]))
        elif event[0] == "free":
            key = event[1]
            if key in own:
                out.append(("free", ("optimizer", key)))
            elif key in target:
                out.append(("free", target[key]))
            elif isinstance(key, tuple) and key[0] == "resident":
                out.append(event)
            else:
                return None  # frees something its micro-steps had freed already: not this model's
        else:
            out.append(event)
    return tuple(out)


def _one_batch(micro: Sequence[Timeline]) -> MemoryTimeline | None:
    """Traces of one batch size that agree: that batch's sizes, as a model valid at that batch alone."""
    first = micro[0] if micro else None
    if first is None or any(t.batch != first.batch or t.events != first.events for t in micro):
        return None
    sizes = tuple((e[2], e[2]) for e in first.events if e[0] == "alloc")
    return MemoryTimeline(first.resident, first.skeleton(), (first.batch, first.batch), sizes)


class _LiveBytes:
    """Live bytes in 512-byte blocks under a cap: the ideal device, with the allocator's interface."""

    def __init__(self, cap: int | None) -> None:
        self.cap, self.allocated, self.peak = cap, 0, 0
        self._sizes: dict[int, int] = {}
        self._next = 1

    def malloc(self, nbytes: int) -> int:
        size = -(-nbytes // _BLOCK) * _BLOCK
        if self.cap is not None and self.allocated + size > self.cap:
            raise AllocatorOutOfMemory(nbytes, size, self.allocated, self.allocated, self.cap)
        handle, self._next = self._next, self._next + 1
        self._sizes[handle] = size
        self.allocated += size
        self.peak = max(self.peak, self.allocated)
        return handle

    def free(self, handle: int) -> None:
        self.allocated -= self._sizes.pop(handle)

    @property
    def peak_reserved_bytes(self) -> int:
        return self.peak

    def reset_peaks(self) -> None:
        self.peak = self.allocated

    def state(self, handles: Sequence[int]) -> tuple[Any, ...]:
        return tuple(self._sizes[h] for h in handles)


class _Run:
    """One training run replayed step by step: an allocator and the ids it holds, in allocation order."""

    def __init__(self, cap: int | None, allocator: bool, config: AllocatorConfig = DEFAULT_CONFIG) -> None:
        self.memory: Any = CachingAllocator(cap, config=config) if allocator else _LiveBytes(cap)
        self.live: dict[Any, int] = {}  # id -> handle, in allocation order
        self.log: list[Event] = []  # every event, with the run's own ids
        self._next = 0

    def place(self, sizes: Sequence[int]) -> bool:
        """Allocate ``sizes`` (the tensors a run starts with), packed; ``False`` if they do not fit."""
        return self.step([("alloc", i, n) for i, n in enumerate(sizes)])[0]

    def step(self, events: Sequence[Event]) -> tuple[bool, int]:
        """Replay one step; whether it fitted, and its peak."""
        return self.blocks([(list(events), 1)])

    def blocks(self, blocks: Sequence[tuple[Sequence[Event], int]]) -> tuple[bool, int]:
        """Replay one step given as blocks of events run ``count`` times in a row (a run of micro-steps
        of one size); a run stops early where the allocator's state repeats, as every later repetition
        then repeats one already replayed (its period kept, so the state after the run is exact)."""
        self.memory.reset_peaks()
        residents = list(self.live)
        ids: dict[Any, Any] = {}
        for events, count in blocks:
            seen: dict[Any, int] = {}
            r = 0
            while r < count:
                if not self._apply(events, residents, ids if count == 1 else {}):
                    return False, self.memory.peak_reserved_bytes
                r += 1
                if count > 1 and r < count:
                    state = self.state()
                    if state in seen:  # a period: skip whole periods, replay what is left of one
                        period = r - seen[state]
                        r += (count - r) // period * period
                        seen.clear()
                    else:
                        seen[state] = r
        return True, self.memory.peak_reserved_bytes

    def _apply(self, events: Sequence[Event], residents: list[Any], ids: dict[Any, Any]) -> bool:
        for event in events:
            if event[0] == "alloc":
                ids[event[1]], self._next = self._next, self._next + 1
                try:
                    self.live[ids[event[1]]] = self.memory.malloc(event[2])
                except AllocatorOutOfMemory:
                    return False
                self.log.append(("alloc", ids[event[1]], event[2]))
            elif event[0] == "free":
                key = event[1]
                target = residents[key[1]] if isinstance(key, tuple) and key[0] == "resident" else ids[key]
                self.memory.free(self.live.pop(target))
                self.log.append(("free", target))
        return True

    def state(self) -> tuple[Any, ...]:
        """Everything the next steps depend on, independent of addresses: the allocator's layout and
        where each live id sits in it (the rank of its block, pool first, then address)."""
        handles = list(self.live.values())
        if isinstance(self.memory, _LiveBytes):
            return self.memory.state(handles)
        small = {h: self.memory.block_size(h) <= _SMALL for h in handles}
        order = sorted(handles, key=lambda h: (small[h], h))
        rank = {h: i for i, h in enumerate(order)}
        return self.memory.layout(), tuple(rank[h] for h in handles)

    def held(self) -> int:
        """The bytes of the live blocks."""
        memory = self.memory
        return memory.allocated_bytes if isinstance(memory, CachingAllocator) else memory.allocated


def survive(
    model: StepModel,
    batch: int,
    cap: int | None,
    *,
    allocator: bool,
    chunks: Sequence[int] | None = None,
    max_steps: int = MAX_STEPS,
    config: AllocatorConfig = DEFAULT_CONFIG,
) -> Survival:
    """Replay training at ``batch`` from a cold start and from steady state, each until its fixed point.

    Args:
        model: the training step.
        batch: the micro-batch.
        cap: the limit (reserved bytes through the allocator model, else live bytes); ``None``: no limit.
        allocator: replay through the model of CUDA's caching allocator, else count live bytes.
        chunks: the micro-batches of one optimizer step, as a plan cuts them (default: as traced).
        max_steps: steps replayed at most per start.
        config: the allocator's configuration (``PYTORCH_CUDA_ALLOC_CONF``: expandable segments, ...).
    """
    steps: list[StepReplay] = []
    fixed: dict[str, int | None] = {}
    growth = 0
    blocks = {cold: model.step_blocks(batch, cold=cold, chunks=chunks) for cold in (True, False)}
    for start in (COLD, STEADY):
        run = _Run(cap, allocator, config)
        if not run.place(model.weights if start == COLD else model.warm_resident):
            steps.append(StepReplay(start, 0, 0, False))
            break
        seen: dict[Any, int] = {}
        fixed[start] = None
        held: list[int] = []
        for k in range(1, max_steps + 1):
            cold = start == COLD and k == 1
            fitted, peak = run.blocks(blocks[cold])
            steps.append(StepReplay(start, k, peak, fitted))
            if not fitted:
                break
            held.append(run.held())
            if cold:
                continue
            state = run.state()
            if state in seen:  # every later step repeats one already replayed
                fixed[start] = seen[state]
                break
            seen[state] = k
        if steps[-1].fitted and fixed[start] is None and len(held) >= 2:
            growth = max(growth, held[-1] - held[-2])
        if not steps[-1].fitted:
            break
    failure = next((s for s in steps if not s.fitted), None)
    fitted_steps = [s for s in steps if s.fitted]
    binding = max(fitted_steps, key=lambda s: s.peak) if fitted_steps else None
    return Survival(failure is None, tuple(steps), failure, binding, fixed, growth)


def prefix(
    model: StepModel, batch: int, start: str, step: int, *, chunks: Sequence[int] | None = None
) -> list[Event] | None:
    """The events of the steps before ``step`` of a run from ``start`` at ``batch``, for
    :meth:`~autobatch.memory.emulate.EmulatedDevice.replay`: what the allocator holds when that step begins.

    The tensors the run starts with are not in it (they are real, and placed first). ``None`` where the
    steps before free one of them (a buffer replaced out of place), which a replay cannot stand for.
    """
    run = _Run(None, allocator=False)
    run.place(model.weights if start == COLD else model.warm_resident)
    placed = len(run.log)
    for k in range(1, step):
        run.step(model.step_events(batch, cold=start == COLD and k == 1, chunks=chunks))
    events = run.log[placed:]
    owned = set(range(placed))
    if any(e[0] == "free" and e[1] in owned for e in events):
        return None
    return [(e[0], ("replayed", e[1]), *e[2:]) for e in events]


class SurvivalPredictor:
    """The largest micro-batch whose training survives, by replay (a
    :class:`autobatch.probing.search.Predictor`).

    Args:
        model: the training step.
        allocator: replay through the model of CUDA's caching allocator, else count live bytes.
        chunks: the micro-batches a plan cuts a batch into (``None``: as traced).
        config: the allocator's configuration.
    """

    def __init__(
        self,
        model: StepModel,
        *,
        allocator: bool,
        chunks: Callable[[int], Sequence[int]] | None = None,
        config: AllocatorConfig = DEFAULT_CONFIG,
    ) -> None:
        self.model, self.allocator, self.chunks, self.config = model, allocator, chunks, config
        self._known: dict[tuple[int, int | None], Survival] = {}

    def survival(self, batch: int, limit: int | None) -> Survival:
        """The replay of training at ``batch`` under ``limit`` (remembered)."""
        key = (batch, limit)
        if key not in self._known:
            chunks = self.chunks(batch) if self.chunks is not None else None
            self._known[key] = survive(
                self.model, batch, limit, allocator=self.allocator, chunks=chunks, config=self.config
            )
        return self._known[key]

    def max_batch(self, limit: int, *, lo: int, hi: int, scan_limit: int = SCAN_BUDGET) -> int:
        """The largest batch in ``[lo, hi]`` whose training survives under ``limit`` (``lo - 1``: none).

        A binary search within the batch ranges where no allocation changes pool or segment kind (the
        allocator), then the batches below the answer replayed for holes: each of them where there are at
        most :data:`SCAN_BUDGET`, else in even strides (what a plan whose micro-batches vary up to the
        answer needs; a hole narrower than the stride can go unseen, the answer itself never).
        """

        def fits(batch: int) -> bool:
            return self.survival(batch, limit).fits

        micro = self.model.micro
        line = micro.points[0] != micro.points[1]
        regions = micro._regions(lo, hi) if self.allocator and line else [(lo, hi)]
        # The replay is not monotone inside a region either (a cold start's second step may fail at a
        # batch whose neighbours survive): the batches below the answer are replayed for holes.
        scan = fits if self.allocator else None
        return largest_in_regions(fits, lo, hi, regions, scan=scan, scan_limit=scan_limit)

    def single_step_max(self, limit: int, *, lo: int, hi: int, scan_limit: int = SCAN_LIMIT) -> int:
        """The largest batch in ``[lo, hi]`` whose one step from steady state, packed, fits (and every
        batch below it, at most ``scan_limit`` of them replayed): what a probe of single steps answers."""

        def one_step(batch: int) -> bool:
            run = _Run(limit, self.allocator, self.config)
            chunks = self.chunks(batch) if self.chunks is not None else None
            blocks = self.model.step_blocks(batch, cold=False, chunks=chunks)
            return run.place(self.model.warm_resident) and run.blocks(blocks)[0]

        micro = self.model.micro
        line = micro.points[0] != micro.points[1]
        regions = micro._regions(lo, hi) if self.allocator and line else [(lo, hi)]
        scan = one_step if self.allocator else None
        return largest_in_regions(one_step, lo, hi, regions, scan=scan, scan_limit=scan_limit)

    def peak(self, batch: int) -> int:
        """The highest peak of training at ``batch`` (no limit), in the units of the limit."""
        return self.survival(batch, None).peak
