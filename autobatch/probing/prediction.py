"""``autobatch.predict``: the largest micro-batch whose training survives on a GPU you don't have.

The probe's answer, without its steps at full size. The probe's two traced steps (a first step from a cold
start at the smallest batch, a step at steady state at the batch above it) run on fake copies of the model
and optimizer (:mod:`autobatch.probing.fake`), under CUDA's kernels for the card
(:mod:`autobatch.step.cudakernels`) with its cuBLAS workspaces resident; their timelines make the step's
model, and the allocator model replays training over consecutive steps at the card's budget
(:mod:`autobatch.memory.survival`): the largest batch that survives is the answer. Nothing at full size is
allocated or computed. Where samples differ in size, the padded case is traced and replayed too, as the
probe confirms it.

Where that cannot be trusted, the result says so (``prediction_notes``) and another way answers:

* the two traced steps do not line up (control flow on the batch size): the probe's own search on fake
  tensors (its batches are real host memory: they are capped to what the host holds);
* the step reads its activations' values (``if h.sum() > 0``, boolean masks, routing): the same on real
  tensors, on a host copy of the model, where the host holds the model's state (and, for the search, the
  limit); otherwise :class:`~autobatch.errors.PredictionError` names the user's line and the way out.

With ``memory_limit=`` alone the steps run the host's kernels on an emulated device of that size: the
answer is ``probe``'s on that device (``tests/probing/test_prediction.py`` checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from autobatch.errors import NoBatchFitsError, PredictionError, UsageValueError
from autobatch.memory.cards import CARDS, WORKSPACE_HANDLES, Card, card, cublas_workspaces
from autobatch.memory.device import default_cpu_limit, resolve_memory_limit, tensor_bytes
from autobatch.options import Options, entry_point
from autobatch.probing.fake import FAKE_LIMITS, fake_session, twin_model, twin_optimizer, user_line
from autobatch.probing.prober import Prober
from autobatch.probing.traced import replayed, searched
from autobatch.result import ProbeResult
from autobatch.session import Session, resolve
from autobatch.step.cudakernels import KernelPolicy, cuda_kernels
from autobatch.step.state import preserved_rng
from autobatch.units import format_bytes

__all__ = ["predict"]

NOT_MODELLED = (
    "not modelled: cuDNN's convolution workspaces, fused attention's backward scratch, NCCL buffers and "
    "DDP's gradient buckets, other processes on the card"
)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a prediction answers for: a card (or a limit alone), the allocator's budget and the precision."""

    card: Card | None
    budget: int
    limit: int | None  # the user's memory_limit
    precision: str
    emulation: str

    @property
    def workspaces(self) -> tuple[int, ...]:
        """The cuBLAS workspaces the card's allocator holds from the first step (none without a card)."""
        return () if self.card is None else cublas_workspaces(self.card.sm)

    @property
    def kernels(self) -> str:
        """``'cuda:8.0'`` (the card's compute capability), or ``'host'``."""
        return "host" if self.card is None else f"cuda:{self.card.sm // 10}.{self.card.sm % 10}"

    def notes(self) -> list[str]:
        c = self.card
        if c is None:
            return [
                "kernels: this host's (its autocast op lists and attention), as probe(memory_limit=...) runs"
            ]
        capped = f", capped by memory_limit={format_bytes(self.budget)}" if self.budget < c.budget else ""
        blocks = self.workspaces
        workspaces = " + ".join(format_bytes(n) for n in blocks[: len(blocks) // WORKSPACE_HANDLES])
        how = "as given" if c.context_bytes is not None else "an estimate from PyTorch's reports"
        return [
            f"{c.name}: {format_bytes(c.total)} as CUDA reports it ({c.source}); the CUDA context keeps "
            f"{format_bytes(c.context)} of it outside the caching allocator ({how}): "
            f"{format_bytes(self.budget)} for the allocator{capped}",
            f"cuBLAS workspaces held by the allocator from the first step: {WORKSPACE_HANDLES} handles "
            f"(the forward's and autograd's threads) × {workspaces}",
        ]


def _target(options: Options) -> Target:
    limit = resolve_memory_limit(options.memory.memory_limit)
    name = options.predict.gpu
    if name is None:
        if limit is None:
            raise UsageValueError(
                f"Expected `gpu` or `memory_limit`, but got neither: pass gpu='A100-80GB' (one of "
                f"{', '.join(CARDS)}) to predict for a card, or memory_limit='24GiB' for a device of that "
                "size."
            )
        return Target(None, limit, limit, options.step.precision, options.memory.emulation)
    found = card(name)
    budget = found.budget if limit is None else min(limit, found.budget)
    precision = "fp16" if options.step.precision == "auto" else options.step.precision  # CUDA's "auto"
    return Target(found, budget, limit, precision, "allocator")


@entry_point("predict")
def predict(model: nn.Module, data: Any, **options: Any) -> ProbeResult:
    """Predict the largest micro-batch whose training survives on a GPU, without the GPU.

    Runs the probe's two traced steps on fake tensors (shapes only: nothing at full size is allocated or
    computed), under the card's CUDA kernels, and replays training through the model of CUDA's caching
    allocator at the card's budget. The model, its optimizer and the random generators are left untouched.

    Args:
        model: the model, on any device (the meta device too: only shapes are read).
        data: as for :func:`autobatch.probe`; it needs the few samples of the traced steps (3, or the floor
            + 1), and the worst case is its largest samples.

    Returns:
        A :class:`~autobatch.result.ProbeResult` with ``predicted=True``, ``gpu``, ``budget_bytes`` (what
        the caching allocator may reserve), ``kernels`` and ``prediction_notes`` (what was assumed, what
        is not modelled, any fallback). Without ``max_batch`` it looks up to 2**20
        (:data:`~autobatch.probing.traced.PREDICT_CAP`).

    Raises:
        UsageTypeError, UsageValueError: a bad argument (an unknown card lists the known ones).
        NoBatchFitsError: not even the smallest batch survives (the message names a card that holds it).
        PredictionError: the step reads its activations' values and this host cannot trace it for real.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        >>> X, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
        >>> result = predict(model, (X, y), gpu="T4", max_batch=4096)
        >>> result.predicted, result.gpu, result.micro_batch, result.capped_by
        (True, 'T4', 4096, 'max_batch')
    """
    started = time.perf_counter()
    parsed = Options.parse("predict", options)
    target = _target(parsed)
    settled = dataclasses.replace(
        parsed,
        memory=dataclasses.replace(parsed.memory, memory_limit=target.budget, emulation=target.emulation),
        step=dataclasses.replace(parsed.step, precision=target.precision),
    )
    session = resolve(model, data, settled)
    first = max(2, session.floor)
    if len(session.source) <= first:
        raise UsageValueError(
            f"Expected `data` to hold at least {first + 1} samples: a prediction traces steps at {first} and "
            f"{first + 1}, but got {len(session.source)}."
        )
    notes = target.notes()
    with preserved_rng():
        try:
            try:
                result = _on_fake_tensors(session, target, notes)
            except FAKE_LIMITS as exc:
                result = _on_real_tensors(session.model, data, settled, target, notes, exc)
        except NoBatchFitsError as exc:
            raise _nothing_fits(exc, target) from None
    limit_kind = (
        f"{format_bytes(target.budget)} of a {target.card.name}'s caching allocator"
        if target.card is not None
        else result.limit_kind
    )
    if target.card is not None:
        notes.append(NOT_MODELLED)
    return dataclasses.replace(
        result,
        predicted=True,
        gpu=target.card.name if target.card is not None else None,
        budget_bytes=target.budget,
        kernels=target.kernels,
        prediction_notes=notes,
        device="cuda" if target.card is not None else result.device,
        memory_limit=target.limit,
        limit_kind=limit_kind + " (predicted)",
        seconds=time.perf_counter() - started,
    )


@contextlib.contextmanager
def _kernels(target: Target, *, fused_attention: bool) -> Iterator[KernelPolicy | None]:
    if target.card is None:
        yield None
        return
    with cuda_kernels(target.card.sm, fused_attention=fused_attention) as policy:
        yield policy


def _on_fake_tensors(session: Session, target: Target, notes: list[str]) -> ProbeResult:
    foreach = True if target.card is not None else None  # CUDA's default for torch's optimizers
    with fake_session(session, foreach=foreach):
        with _kernels(target, fused_attention=True) as policy, session.start():
            runtime = [torch.empty(n, dtype=torch.uint8) for n in target.workspaces]  # fake
            make = partial(Prober, session, values=False, kernels=policy, runtime=runtime)
            result = replayed(make(), notes)
            if result is None:
                result = searched(make(), notes, "fake tensors")
        if policy is not None:
            notes.append("kernels: " + policy.describe())
    return result


def _on_real_tensors(
    module: nn.Module, data: Any, options: Options, target: Target, notes: list[str], exc: BaseException
) -> ProbeResult:
    what = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    where = user_line(exc)
    read = f"the step reads values of its activations ({what}) at {where}"
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise PredictionError(
            f"Cannot predict {type(module).__name__}: {read}, and its weights are on the meta device, which "
            "holds no values to read. Build it on the CPU, or run autobatch.probe on the card itself."
        ) from exc
    params = tensor_bytes(module.parameters())
    need = 4 * params + tensor_bytes(module.buffers())  # weights, gradients and two moments, on the host
    if need > default_cpu_limit():
        raise PredictionError(
            f"Cannot predict {type(module).__name__}: {read}, and tracing it on real tensors needs about "
            f"{format_bytes(need)} of host memory, more than half of what is available. Run autobatch.probe "
            "on the card itself, or predict on a host with more memory."
        ) from exc
    notes.append(f"{read}: traced on real tensors, on a copy of the model")
    twin = twin_model(module)
    settings: dict[str, Any] = {"foreach": True} if target.card is not None else {}
    user = options.step.optimizer
    optimizer = twin_optimizer(user, module, twin, **settings) if user is not None else None
    session = resolve(
        twin, data, dataclasses.replace(options, step=dataclasses.replace(options.step, optimizer=optimizer))
    )
    with _kernels(target, fused_attention=False) as policy, session.start():
        if session.optimizer is None:
            trainable = [p for p in twin.parameters() if p.requires_grad]
            session.optimizer = torch.optim.AdamW(trainable, lr=1e-3, **settings)
        runtime = [torch.empty(n, dtype=torch.uint8) for n in target.workspaces]
        make = partial(Prober, session, kernels=policy, runtime=runtime)
        result = replayed(make(), notes)
        if result is None:
            if target.budget > default_cpu_limit():
                raise PredictionError(
                    f"Cannot predict {type(module).__name__}: {read}, and its traced steps do not line up, "
                    f"so only the probe's search can answer, which needs up to {format_bytes(target.budget)} "
                    "of host memory, more than half of what is available. Run autobatch.probe on the card."
                ) from exc
            result = searched(make(), notes, "real tensors")
    if policy is not None:
        attention = ""
        if policy.backends:  # the fused kernels have no CPU kernel to run real tensors
            attention = "; attention on the host's math path, which holds its scores: the answer is low"
        notes.append(f"kernels: CUDA's autocast op lists and dropout{attention}")
    return result


def _nothing_fits(exc: NoBatchFitsError, target: Target) -> NoBatchFitsError:
    """The probe's no-fit error, for a card: the smallest card of the table that holds the smallest batch."""
    c = target.card
    if c is None:
        return exc
    needed = exc.needed_bytes
    budget = format_bytes(target.budget)
    what = str(exc).partition(" Try ")[0].replace("measured without the limit", "predicted without a limit")
    what = what.replace(f"under {budget}", f"on a {c.name} ({budget} for the caching allocator)")
    holds = sorted(
        (o for o in CARDS.values() if needed is not None and o.budget >= needed), key=lambda o: o.budget
    )
    if target.budget < c.budget:  # memory_limit capped the card's allocator
        hint = (
            f"memory_limit='{format_bytes(needed, up=True)}' or more" if needed else "a larger memory_limit"
        )
    elif holds:
        hint = (
            f"a card with more memory (the smallest in the table that holds it: {holds[0].name}, "
            f"{format_bytes(holds[0].budget)} for the allocator)"
        )
    else:
        hint = "several cards (no card in the table holds it alone)"
    fp32 = ", precision='bf16' or 'fp16'" if target.precision == "fp32" else ""
    message = f"{what} Try {hint}, a smaller model, an optimizer with less state (SGD instead of Adam){fp32}."
    return NoBatchFitsError(
        message, memory_limit=exc.memory_limit, model_state=exc.model_state, needed_bytes=needed
    )
