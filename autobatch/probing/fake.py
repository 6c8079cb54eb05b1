"""Fake tensors for a prediction: the user's training step, run on shapes alone.

A prediction (:mod:`autobatch.probing.prediction`) runs the probe's traced steps on copies of the model and
optimizer whose tensors are fake (``torch._subclasses.fake_tensor``): every op computes its output's shape,
dtype and strides, and allocates nothing. The emulated device (:mod:`autobatch.memory.emulate`) counts a
fake storage as it counts a real one: its size is known, and a weak reference to it fires when the last
tensor on it dies. Bottom to top of the dispatch stack, inside :func:`fake_session`::

    EmulatedDevice            counts every new output storage (the probe's, unchanged)
    RealWhereCheap            ops on real tensors alone run for real; normalisation statistics' dtypes fixed
    FakeTensorMode            whatever touches a parameter: shapes only

The batch stays real (a few samples), so code that reads the batch's values (a padding mask's ``all()``,
Hugging Face's check of whether it is being traced) takes the path it takes in training. Code that reads an
activation's values (``if h.sum() > 0``, ``h[h > 0]``) raises one of :data:`FAKE_LIMITS`: a prediction then
says so, naming the user's line (:func:`user_line`), and falls back to real tensors.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from autobatch.memory.emulate import flat_tensors
from autobatch.memory.footprint import kept_tensors

__all__ = [
    "FAKE_LIMITS",
    "HostReads",
    "RealWhereCheap",
    "ShapeOnlyScaler",
    "fake_session",
    "twin_model",
    "twin_optimizer",
    "user_line",
]

FAKE_LIMITS = (
    fake_tensor.DataDependentOutputException,
    fake_tensor.DynamicOutputShapeException,
    fake_tensor.UnsupportedOperatorException,
)
"""What a fake step raises where the model needs values: ``.item()`` or ``bool()`` of an activation, an op
whose output's shape depends on values (``nonzero``, boolean indexing), an op without a fake kernel."""

_REDUCED = (torch.bfloat16, torch.float16)


# -- the model and optimizer, twinned ------------------------------------------------------------------------
def twin_model(model: nn.Module, mode: FakeTensorMode | None = None) -> nn.Module:
    """A copy of ``model`` whose parameters, buffers and kept tensors live in storages of their own on the
    host: fake ones under ``mode`` (nothing allocated), else copies of their bytes. Tensors that shared a
    storage still do; the module tree and its plain attributes are copied as they are."""
    made: dict[int, torch.Tensor] = {}
    memo: dict[int, Any] = {}
    within = mode if mode is not None else contextlib.nullcontext()

    def twin(t: torch.Tensor) -> torch.Tensor:
        original = t.untyped_storage()  # keyed outside the fake mode: its address is the real storage's
        base = made.get(original._cdata)
        if base is None:
            if mode is not None:
                with mode:
                    base = torch.empty(original.nbytes(), dtype=torch.uint8, device="cpu")
            else:
                source = torch.empty(0, dtype=torch.uint8, device=t.device).set_(original)
                base = source.to("cpu", copy=True)
            made[original._cdata] = base
        with within:
            out = torch.empty(0, dtype=t.dtype, device="cpu")
            return out.set_(base.untyped_storage(), t.storage_offset(), t.shape, t.stride())

    with torch.no_grad():
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(twin(p), requires_grad=p.requires_grad)
        for t in [*model.buffers(), *kept_tensors(model)]:
            if id(t) not in memo:
                memo[id(t)] = twin(t).requires_grad_(t.requires_grad)
    return copy.deepcopy(model, memo)


def twin_optimizer(
    optimizer: torch.optim.Optimizer, real: nn.Module, twin: nn.Module, **settings: Any
) -> torch.optim.Optimizer:
    """``optimizer`` over ``twin``'s parameters: its class, hyper-parameters and attributes, no state (a
    copy starts cold). ``settings`` fill the group settings the user left to the default (``foreach=True``,
    as CUDA's default picks for torch's optimizers, where ``foreach`` is ``None`` and nothing is fused)."""
    memo: dict[int, Any] = {id(p): q for p, q in zip(real.parameters(), twin.parameters(), strict=True)}
    memo[id(optimizer.state)] = collections.defaultdict(dict)  # the first step makes it again
    copied = object.__new__(type(optimizer))
    # Its __dict__, not copy.deepcopy(optimizer): Optimizer.__getstate__ keeps three keys, and an optimizer
    # of the user's own may keep more.
    copied.__dict__ = copy.deepcopy(optimizer.__dict__, memo)
    for name in [n for n in copied.__dict__ if callable(getattr(type(copied), n, None))]:
        # An instance attribute shadowing a method (an LR scheduler wraps `step` this way) calls into the
        # user's optimizer: the copy runs the class's own.
        del copied.__dict__[name]
    for group in copied.param_groups:
        if not group.get("fused"):
            group.update({k: v for k, v in settings.items() if k in group and group[k] is None})
    return copied


class ShapeOnlyScaler(torch.amp.GradScaler):
    """A GradScaler that never reads a value: it allocates what GradScaler does (its scale, growth tracker,
    the inf checks of ``unscale_``), applies every step (as one without an overflow) and keeps its scale."""

    def _maybe_opt_step(self, optimizer: Any, optimizer_state: Any, *args: Any, **kwargs: Any) -> Any:
        return optimizer.step(*args, **kwargs)

    def get_scale(self) -> float:
        return float(self._init_scale) if self.is_enabled() else 1.0


# -- the dispatch mode between the emulated device and the fake mode -----------------------------------------
_aten = torch.ops.aten
_STATISTICS = {  # the ops whose statistics (outputs 1 and 2) the CPU and CUDA kernels make in float32 for a
    # reduced-precision input with float32 weights; their meta kernels keep the input's dtype. Value: the
    # position of the weight argument.
    _aten.native_batch_norm.default: 1,
    _aten._native_batch_norm_legit.default: 1,
    _aten._native_batch_norm_legit.no_stats: 1,
    _aten._native_batch_norm_legit_functional.default: 1,
    _aten.native_layer_norm.default: 2,
    _aten.native_group_norm.default: 1,
}


def _float_statistics(func: Any, args: tuple[Any, ...], out: Any) -> Any:
    x, position = args[0], _STATISTICS[func]
    weight = args[position] if len(args) > position else None
    if not (isinstance(x, FakeTensor) and x.dtype in _REDUCED):
        return out
    if not (isinstance(weight, torch.Tensor) and weight.dtype == torch.float32):
        return out
    out = list(out)
    for i in (1, 2):
        t = out[i]
        if isinstance(t, torch.Tensor) and t.dtype in _REDUCED:
            out[i] = torch.empty_strided(t.shape, t.stride(), dtype=torch.float32, device=t.device)
    return tuple(out)


class RealWhereCheap(TorchDispatchMode):
    """Between the emulated device and the fake mode: an op none of whose tensor arguments is fake runs for
    real (the batch, its masks and position ids, ``torch.tensor(x)`` literals, optimizer step counters);
    whatever touches a parameter stays fake. Ops without tensor arguments (factories) stay fake."""

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        tensors = flat_tensors((args, kwargs), [])
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        return _float_statistics(func, args, out) if func in _STATISTICS else out


class HostReads:
    """A data source whose methods run with the fake mode lifted: samples are read and collated for real,
    as on the host (a collate function's ``torch.zeros`` would otherwise make a fake batch, whose values
    the model could not read)."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._source, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def on_the_host(*args: Any, **kwargs: Any) -> Any:
            with unset_fake_temporarily():
                return value(*args, **kwargs)

        return on_the_host


@contextlib.contextmanager
def fake_session(session: Any, *, foreach: bool | None = None) -> Iterator[FakeTensorMode]:
    """Inside the block, ``session``'s model and optimizer are fake twins of the user's (which are never
    touched), its data is read on the host (:class:`HostReads`) and the fake modes are entered; leaving
    puts the session's own back.

    Args:
        session: a resolved :class:`~autobatch.session.Session`.
        foreach: set the optimizer's ``foreach`` (``True`` where CUDA's default would pick it), or keep it.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    saved = session.model, session.optimizer, session.ddp, session.source
    model = twin_model(session.model, mode)
    settings: dict[str, Any] = {} if foreach is None else {"foreach": foreach}
    if session.optimizer is not None:
        optimizer = twin_optimizer(session.optimizer, session.model, model, **settings)
    else:  # the default training would build
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3, **settings)
    session.model, session.optimizer, session.ddp = model, optimizer, None
    session.source = HostReads(session.source)
    try:
        with mode, RealWhereCheap():
            yield mode
    finally:
        session.model, session.optimizer, session.ddp, session.source = saved


_OWN = (Path(torch.__file__).parent, Path(__file__).resolve().parents[1])


def user_line(exc: BaseException) -> str:
    """Where the step asked for a value: the innermost frame outside torch and autobatch, as
    ``'model.py:13 (return self.b(h) if h.sum() > 0 else self.c(h))'``."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename)
        if not any(path.is_relative_to(own) for own in _OWN) and not frame.filename.startswith("<"):
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return "inside torch"
