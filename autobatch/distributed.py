"""torchrun / DDP glue: the only module that talks to ``torch.distributed``.

Under ``torchrun --nproc-per-node N`` every rank probes, trains and evaluates; the ranks agree through a
handful of small collectives, always issued by every rank at the same point of the same code path, so
that no rank can wait on a collective the others skipped:

* **Probe.** After each trial every rank contributes its out-of-memory flag and peaks (all-reduce MAX) and
  the memory limits are reduced to the smallest (MIN) before the search starts, so all ranks take the same
  branch of the search and reach the same, smallest, micro-batch.
* **Training.** Every micro-step runs under DDP's ``no_sync()``: DDP reduces gradients *inside* a backward,
  and a rank that ran out of memory half-way through it would leave the others blocked in that reduction
  forever. Instead, once a rank's micro-steps are done, all ranks exchange one OOM flag (all-reduce SUM,
  with the step's loss); if any rank ran out of memory, every rank drops its gradients, backs off and
  redoes the step. Otherwise the accumulated gradients are summed across ranks in place (each micro-loss
  is already weighted by its share of the *global* batch) and every rank takes the same optimizer step.
* **Data.** Each epoch's order is one seeded permutation shared by all ranks (a fresh one per epoch, as
  ``DistributedSampler.set_epoch`` gives); each optimizer step's ``target_batch`` samples are cut into
  ``world_size`` contiguous shares. No sample is padded or repeated: each is seen once per epoch.
* **Failures.** Whatever fails on one rank (an out-of-memory, an exception in the user's code, a refused
  setup) is agreed on before any rank acts on it (:meth:`Group.agree`): the failing rank raises its own
  error, the others a :class:`~autobatch.errors.PeerError` naming it, so no rank waits forever.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autobatch.errors import PeerError, UsageValueError

__all__ = [
    "Group",
    "agree",
    "expected_world_size",
    "fail_together",
    "launched_by_torchrun",
    "local_device",
    "no_sync",
    "setup",
    "share",
    "syncs_buffers",
    "unwrap",
    "wrap",
]

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process as one of several ranks (a group is or will be needed)."""
    return all(os.environ.get(v) for v in _TORCHRUN_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def expected_world_size() -> int:
    """The ranks this process will train with: the group's, else torchrun's ``WORLD_SIZE``, else 1.

    Known before any group is created, so that a target the ranks cannot share is refused first.
    """
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def local_device() -> torch.device | None:
    """``cuda:LOCAL_RANK`` under torchrun on a CUDA machine, else ``None`` (the usual default applies)."""
    if launched_by_torchrun() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


def _unmeasured() -> contextlib.AbstractContextManager[Any]:
    """Outside an emulated device's count: the few bytes a collective's buffers take are not the model's,
    and gloo frees them on its own threads, which would make a step's trace differ from rank to rank."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


@dataclass(frozen=True)
class Group:
    """The data-parallel ranks of the default process group, seen from this rank."""

    rank: int
    world_size: int
    device: torch.device  # where collective tensors live: CUDA for NCCL, the CPU for gloo

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that prints, logs and writes."""
        return self.rank == 0

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        with _unmeasured():
            tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
            dist.all_reduce(tensor, op=op)
            return [float(v) for v in tensor.tolist()]

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maximum over ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def min(self, values: Sequence[float]) -> list[float]:
        """Element-wise minimum over ranks."""
        return self._reduce(values, dist.ReduceOp.MIN)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def exchange(self, values: Sequence[float]) -> list[list[float]]:
        """Every rank's ``values`` (the same length on every rank), in rank order, on every rank."""
        with _unmeasured():
            mine = torch.tensor(list(values), dtype=torch.float64, device=self.device)
            out = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(out, mine)
            return [[float(v) for v in t.tolist()] for t in out]

    def check_same(self, what: str, value: int) -> None:
        """Raise on every rank unless every rank has the same ``value`` (a dataset length, say)."""
        values = [int(v[0]) for v in self.exchange([value])]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise UsageValueError(
                f"Expected every rank to have the same {what}, but got {per_rank}. Every rank must see "
                "the same data (autobatch shards each step itself), or the ranks would wait for each other "
                "forever."
            )

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks, in place (a missing gradient counts as zeros).

        In place and per parameter, so the reduction needs no device memory beyond the gradients the
        probe already measured; the reductions are launched together and awaited at the end.
        """
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.device.type == "cpu":
            # gloo: reduce one flat copy, outside an emulated device's count. gloo's threads release
            # the tensors they reduce a moment after the wait returns; were they the gradients, an
            # emulated device would see them freed at a different moment on every run (a GPU's NCCL
            # reduces in place, and the gradients are there anyway).
            with _unmeasured(), torch.no_grad():
                grads = [p.grad for p in params if p.grad is not None]
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
            return
        works = [dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True) for p in params]
        for work in works:
            work.wait()

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank, as DDP's construction copies them."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP's broadcast_buffers."""
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def agree(group: Group | None, failure: BaseException | None, where: str) -> None:
    """Stop every rank together when any of them failed ``where``; return when none did.

    In one process this re-raises ``failure``. Under a group every rank takes part (one small all-gather):
    see :func:`fail_together`.
    """
    if group is None:
        if failure is not None:
            raise failure
        return
    flags = group.exchange([float(failure is not None)])
    fail_together(group, failure, [rank for rank, (flag,) in enumerate(flags) if flag], where)


def fail_together(group: Group, failure: BaseException | None, failed: list[int], where: str) -> None:
    """With ``failed`` ranks (agreed by every rank), raise on every rank; return when there are none.

    The failing ranks re-raise their own errors; the others raise :class:`~autobatch.errors.PeerError`
    with the failing ranks' messages (gathered here, so every rank must call this at the same point).
    """
    if not failed:
        return
    messages = group.gather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    texts = [str(messages[r]) for r in failed]
    detail = "; ".join(f"rank {r}: {t}" for r, t in zip(failed, texts, strict=True))
    raise PeerError(
        f"{'Rank' if len(failed) == 1 else 'Ranks'} {', '.join(map(str, failed))} failed {where} ({detail}); "
        f"rank {group.rank} stops with {'it' if len(failed) == 1 else 'them'}.",
        ranks=failed,
        messages=texts,
    )


class _MainRankOnly(logging.Filter):
    """Drops autobatch's log records on every rank but 0, so a run logs once, not once per rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


_MAIN_RANK_ONLY = _MainRankOnly()


def setup(device: torch.device | None = None) -> Group | None:
    """The data-parallel group, initialising it from torchrun's environment when needed.

    Returns ``None`` in a single process (no group, or a group of one). When torchrun launched this
    process and no group exists yet, one is created: NCCL for CUDA devices, gloo otherwise.

    Example:
        >>> setup() is None  # a plain single process
        True
    """
    if not dist.is_available() or not (dist.is_initialized() or launched_by_torchrun()):
        return None
    # Before the group is created, so that its own initialisation is logged once too. Logger filters
    # apply where a record is made, not where it propagates: filter every module's logger.
    for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "autobatch"]:
        logging.getLogger(name).addFilter(_MAIN_RANK_ONLY)  # idempotent: a filter is added once
    if not dist.is_initialized():
        cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        logger.info("initialised a %s process group of %d ranks", dist.get_backend(), dist.get_world_size())
    world_size = dist.get_world_size()
    if world_size == 1:
        return None
    if dist.get_backend() == "nccl":
        comm_device = torch.device("cuda", torch.cuda.current_device())
    else:
        comm_device = torch.device("cpu")
    return Group(rank=dist.get_rank(), world_size=world_size, device=comm_device)


def unwrap(model: nn.Module) -> tuple[nn.Module, DistributedDataParallel | None]:
    """The module inside a ``DistributedDataParallel`` wrapper (and the wrapper), or ``model`` itself."""
    if isinstance(model, DistributedDataParallel):
        return model.module, model
    return model, None


def wrap(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wrap ``module`` in DDP: rank 0's parameters and buffers are copied to every rank on construction.

    DDP's own buffer broadcast in the forward pass is a collective that would pair wrongly with the
    out-of-memory agreement when one rank stops early; autobatch broadcasts buffers after each step.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (the old name warns).
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_forward_sync: dict[str, Any] = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=device_ids, **no_forward_sync)


def syncs_buffers(ddp: DistributedDataParallel) -> bool:
    """Whether a user's DDP wrapper was asked to broadcast buffers (its default)."""
    value = getattr(ddp, "forward_sync_buffers", None)
    return bool(ddp.broadcast_buffers if value is None else value)


@contextlib.contextmanager
def no_sync(ddp: DistributedDataParallel | None) -> Iterator[None]:
    """DDP's ``no_sync()`` (gradients stay local until autobatch sums them), or nothing without DDP."""
    if ddp is None:
        yield
        return
    # A user's wrapper may broadcast buffers in its first forward: a collective that one rank could skip
    # after an out-of-memory. autobatch broadcasts buffers itself, at the end of each step.
    forward_sync = ddp.require_forward_param_sync
    ddp.require_forward_param_sync = False
    try:
        with ddp.no_sync():
            yield
    finally:
        ddp.require_forward_param_sync = forward_sync


def share(indices: Sequence[int], rank: int, world_size: int, min_share: int = 1) -> list[int]:
    """This rank's contiguous share of one step's samples; shares differ in size by at most one.

    With ``min_share`` (2 for BatchNorm models, which cannot train on one sample), no rank gets a share
    below it: a step too short for every rank leaves the last ranks nothing instead.

    Example:
        >>> [share(list(range(7)), r, 3) for r in range(3)]
        [[0, 1, 2], [3, 4], [5, 6]]
        >>> [share(list(range(3)), r, 2, min_share=2) for r in range(2)]
        [[0, 1, 2], []]
    """
    ranks = max(1, min(world_size, len(indices) // min_share))
    if rank >= ranks:
        return []
    base, extra = divmod(len(indices), ranks)
    start = rank * base + min(rank, extra)
    return list(indices[start : start + base + (1 if rank < extra else 0)])
