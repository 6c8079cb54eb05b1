"""The ranks of :mod:`tests.test_distributed`: importable, so that spawned processes can unpickle them.

:func:`launch` starts ``world_size`` processes with torchrun's environment (``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and runs a list of scenarios in each, in
order; each rank's results come back as a dict per scenario. Starting a rank costs seconds (importing
torch, scikit-learn, and torch._dynamo with the first optimizer), so one launch runs many scenarios.

The shared factories (:func:`mlp`, :func:`vectors`, :class:`Indexed`, :func:`record_ids`) build the same
model and data in a rank as in the single-process reference that the tests compare against.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import autobatch
from autobatch.step.stepper import Stepper

__all__ = [
    "MODELS",
    "SCENARIOS",
    "Indexed",
    "LaunchError",
    "free_port",
    "items",
    "launch",
    "mlp",
    "mlp_bn",
    "rank_loader",
    "record_ids",
    "vectors",
]

LR = 0.1


# -- shared model and data -------------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Module:
    """A 16 → 64 → 4 MLP with seeded weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))


def vectors(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random 16-vectors and labels in 0..3, the same for every seed on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=generator), torch.randint(0, 4, (n,), generator=generator)


class Indexed(Dataset[dict[str, torch.Tensor]]):
    """Samples ``{"x", "y", "idx"}`` that carry their own index, so a step can tell which it saw."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.x, self.y = vectors(n, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "idx": torch.tensor(i)}


def mlp_bn(seed: int = 0) -> nn.Module:
    """The MLP with a BatchNorm layer, whose running statistics each rank computes on its own samples."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))


MODELS = {"mlp": mlp, "mlp_bn": mlp_bn}


def items(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``num_items``: sample ``i`` counts as ``i % 3 + 1`` items (tokens, say)."""
    return (batch["idx"] % 3 + 1).sum()


def record_ids(
    seen: list[int], *, weighted: bool = False
) -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """A ``step_fn`` that appends the indices of each micro-batch to ``seen``.

    With ``weighted``, the loss is the mean over :func:`items` (each sample's loss counts
    ``idx % 3 + 1`` times), as a token-level loss averages over a micro-batch's tokens.
    """

    def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.extend(int(i) for i in batch["idx"].tolist())
        losses = nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
        if not weighted:
            return losses.mean()
        counts = (batch["idx"] % 3 + 1).to(losses.dtype)
        return (losses * counts).sum() / counts.sum()

    return step_fn


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    module = model.module if isinstance(model, DistributedDataParallel) else model
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR)


def fit_options(**overrides: Any) -> dict[str, Any]:
    """The options every distributed fit and its single-process reference share."""
    return {"precision": "fp32", "device": "cpu", "progress": False, **overrides}


def summary(result: autobatch.FitResult) -> dict[str, Any]:
    return {
        "micro_batch": result.probe.micro_batch if result.probe is not None else None,
        "plan": result.plan.to_dict(),
        "final_plan": result.final_plan.to_dict(),
        "backoffs": list(result.backoffs),
        "epochs": result.epochs,
        "steps": result.optimizer_steps,
        "samples": result.samples,
        "losses": result.losses,
        "report": result.report.to_dict() if result.report is not None else None,
    }


# -- scenarios: each runs in every rank and returns that rank's results ----------------------------
def probe_own_limit(rank: int, limits: list[str], n: int) -> dict[str, Any]:
    """Probe with this rank's own emulated memory limit."""
    model = mlp()
    result = autobatch.probe(
        model, vectors(n), optimizer=sgd(model), precision="fp32", memory_limit=limits[rank], device="cpu"
    )
    return {"micro_batch": result.micro_batch, "max_fitting_batch": result.max_fitting_batch}


def fit_tensors(
    rank: int, n: int, eval_n: int | None = None, model: str = "mlp", **options: Any
) -> dict[str, Any]:
    """``fit`` a plain (unwrapped) model on tensors; fit wraps it in DDP itself."""
    net = MODELS[model]()
    eval_data = vectors(eval_n, seed=1) if eval_n else None
    result = autobatch.fit(net, vectors(n), optimizer=sgd(net), eval_data=eval_data, **fit_options(**options))
    return {**summary(result), "weights": weights(net)}


def fit_indexed(
    rank: int, n: int, weighted: bool = False, rng_per_rank: bool = False, **options: Any
) -> dict[str, Any]:
    """``fit`` on :class:`Indexed` samples, recording the sample ids this rank trained on.

    Args:
        weighted: weight micro-losses by :func:`items` (``num_items``) instead of samples.
        rng_per_rank: seed torch differently on each rank first, as unrelated processes are.
    """
    model, seen = mlp(), []
    if rng_per_rank:
        torch.manual_seed(1000 + rank)
    if weighted:
        options["num_items"] = items
    step_fn = record_ids(seen, weighted=weighted)
    result = autobatch.fit(model, Indexed(n), optimizer=sgd(model), step_fn=step_fn, **fit_options(**options))
    return {**summary(result), "weights": weights(model), "seen": seen}


@contextlib.contextmanager
def oom_in_micro_step(rank: int, oom_rank: int, oom_call: int) -> Iterator[list[int]]:
    """Inside the block, the ``oom_call``-th micro-step of rank ``oom_rank`` (only) runs out of memory;
    yields the count of micro-steps so far (a one-item list)."""
    original, calls = Stepper.forward_backward, [0]

    def forward_backward(self: Stepper, batch: Any, weight: float = 1.0) -> torch.Tensor:
        calls[0] += 1
        if rank == oom_rank and calls[0] == oom_call:
            raise torch.OutOfMemoryError("injected")
        return original(self, batch, weight)

    Stepper.forward_backward = forward_backward  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        Stepper.forward_backward = original  # type: ignore[method-assign]


def fit_oom_on_rank(rank: int, oom_rank: int, oom_call: int, n: int, **options: Any) -> dict[str, Any]:
    """``fit`` while the ``oom_call``-th micro-step of rank ``oom_rank`` (only) runs out of memory."""
    with oom_in_micro_step(rank, oom_rank, oom_call) as calls:
        out = fit_tensors(rank, n, **options)
    return {**out, "backward_calls": calls[0]}


class OomOnceSGD(torch.optim.SGD):
    """The issue's repro: an SGD whose ``step`` raises an out-of-memory once, on one rank, before stepping."""

    def __init__(self, params: Any, oom: bool, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.oom = oom

    def step(self, closure: Any = None) -> Any:
        if self.oom:
            self.oom = False
            raise torch.OutOfMemoryError("injected in optimizer.step")
        return super().step(closure)


def _outcome(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s results, or the error it raised (its type, message and attributes) in their place."""
    try:
        return {"error": None, **run()}
    except Exception as exc:
        cause, trained = exc.__cause__, getattr(exc, "result", None)  # an EvaluationError's
        return {
            "error": type(exc).__name__,
            "message": str(exc),
            "partial": getattr(exc, "partial", None),
            "ranks": getattr(exc, "ranks", None),
            "cause": None if cause is None else type(cause).__name__,
            "cause_ranks": getattr(cause, "ranks", None),
            "trained": None if trained is None else summary(trained),
            "notes": list(getattr(exc, "__notes__", [])),
        }


def fit_optimizer_oom(rank: int, oom_rank: int, kind: str, n: int, **options: Any) -> dict[str, Any]:
    """``fit`` while ``optimizer.step`` runs out of memory once on rank ``oom_rank``.

    ``kind``: ``"subclass"`` (an SGD subclass raising before it steps: autobatch cannot see inside a
    step defined outside torch), ``"clean"`` (Adam's lazy state initialisation raising: nothing changed)
    or ``"partial"`` (plain SGD raising after it updated its first parameter).
    """
    net = mlp()
    faulty = rank == oom_rank
    patches: list[tuple[Any, str, Any]] = []
    if kind == "subclass":
        optimizer: torch.optim.Optimizer = OomOnceSGD(net.parameters(), faulty, lr=LR)
    elif kind == "clean":
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        real_init = torch.optim.Adam._init_group
        fired = [not faulty]

        def init_group(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not fired[0]:
                fired[0] = True
                raise torch.OutOfMemoryError("injected in Adam's state initialisation")
            return real_init(self, *args, **kwargs)

        patches.append((torch.optim.Adam, "_init_group", init_group))
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=LR, foreach=False)
        sgd_module = importlib.import_module("torch.optim.sgd")
        real_sgd = sgd_module._single_tensor_sgd
        fired = [not faulty]

        def half_sgd(
            params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[Any], *a: Any, **k: Any
        ) -> Any:
            if fired[0]:
                return real_sgd(params, grads, bufs, *a, **k)
            fired[0] = True
            real_sgd(params[:1], grads[:1], bufs[:1], *a, **k)  # the first parameter is updated...
            raise torch.OutOfMemoryError("injected half-way through SGD")  # ...then memory runs out

        patches.append((sgd_module, "_single_tensor_sgd", half_sgd))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    eval_data = vectors(37, seed=1)
    injected = (lambda: not optimizer.oom) if kind == "subclass" else (lambda: fired[0])  # type: ignore[attr-defined]
    try:
        out = _outcome(
            lambda: {
                **summary(
                    autobatch.fit(
                        net, vectors(n), optimizer=optimizer, eval_data=eval_data, **fit_options(**options)
                    )
                ),
                "weights": weights(net),
            }
        )
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    return {**out, "after_weights": weights(net), "injected": faulty and injected()}


class FailingIndexed(Indexed):
    """:class:`Indexed`, whose sample ``bad`` cannot be read."""

    def __init__(self, n: int, bad: int) -> None:
        super().__init__(n)
        self.bad = bad

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i == self.bad:
            raise KeyError(f"sample {i} is corrupt")
        return super().__getitem__(i)


class FlakyIndexed(Indexed):
    """:class:`Indexed`, whose sample ``bad`` runs out of memory its first ``failures`` reads."""

    def __init__(self, n: int, bad: int, failures: int) -> None:
        super().__init__(n)
        self.bad, self.failures = bad, failures

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i == self.bad and self.failures > 0:
            self.failures -= 1
            raise torch.OutOfMemoryError(f"injected: reading sample {i}")
        return super().__getitem__(i)


def fit_flaky_data(rank: int, failures: int, n: int, **options: Any) -> dict[str, Any]:
    """``fit`` while reading sample 50 (rank 1's share of the second step, unshuffled) runs out of memory
    ``failures`` times on rank 1 only."""
    model, seen = mlp(), []
    data = FlakyIndexed(n, bad=50, failures=failures if rank == 1 else 0)
    step_fn = record_ids(seen)
    return _outcome(
        lambda: {
            **summary(
                autobatch.fit(model, data, optimizer=sgd(model), step_fn=step_fn, **fit_options(**options))
            ),
            "weights": weights(model),
            "seen": seen,
        }
    )


def fit_error_on_rank(rank: int, where: str, n: int, **options: Any) -> dict[str, Any]:
    """``fit`` while something other than memory fails on rank 1 only: its forward, data or evaluation."""
    model = mlp()
    data: Any = Indexed(n)
    step_fn = record_ids([])
    predict_fn = None
    calls = [0]
    if where == "forward":

        def failing_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            calls[0] += 1
            if rank == 1 and calls[0] == 3:
                raise ValueError("the user's forward failed on rank 1")
            return record_ids([])(model, batch)

        step_fn = failing_step
    elif where == "data":
        data = FailingIndexed(n, bad=50)  # rank 1's share of the second step, unshuffled
    else:

        def predict_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if rank == 1:
                raise RuntimeError("the user's predict_fn failed on rank 1")
            return model(batch["x"]).argmax(-1), batch["y"]

        options["eval_data"] = Indexed(20, seed=1)
    if predict_fn is not None:
        options["predict_fn"] = predict_fn
    return _outcome(
        lambda: summary(
            autobatch.fit(model, data, optimizer=sgd(model), step_fn=step_fn, **fit_options(**options))
        )
    )


def fit_batchnorm_sizes(rank: int, n: int, **options: Any) -> dict[str, Any]:
    """``fit`` the BatchNorm MLP on tensors, recording the size of every micro-batch this rank trained on."""
    net, sizes = mlp_bn(), []

    def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        sizes.append(len(batch[0]))
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    result = autobatch.fit(net, vectors(n), optimizer=sgd(net), step_fn=step_fn, **fit_options(**options))
    return {**summary(result), "sizes": sizes, "weights": weights(net)}


def fit_lengths(rank: int, lengths: list[int], **options: Any) -> dict[str, Any]:
    """``fit`` with a dataset of another length on each rank."""
    model = mlp()
    return _outcome(
        lambda: summary(
            autobatch.fit(model, vectors(lengths[rank]), optimizer=sgd(model), **fit_options(**options))
        )
    )


def fit_error(rank: int, n: int, **options: Any) -> dict[str, Any]:
    """``fit`` that is expected to refuse its arguments: the error comes back instead of raising."""
    model = mlp()
    try:
        autobatch.fit(model, vectors(n), optimizer=sgd(model), **fit_options(**options))
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None, "message": ""}


def init_group_as_user(rank: int, port: int) -> dict[str, Any]:
    """Replace the group autobatch initialised with one this "user script" initialises itself."""
    world_size = dist.get_world_size()
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    return {"backend": dist.get_backend()}


def fit_user_ddp(rank: int, n: int, **options: Any) -> dict[str, Any]:
    """``fit`` a model the user wrapped in DDP, with an optimizer over ``ddp.module``'s parameters."""
    ddp = DistributedDataParallel(mlp())
    result = autobatch.fit(ddp, vectors(n), optimizer=sgd(ddp.module), **fit_options(**options))
    return {**summary(result), "weights": weights(ddp), "still_ddp": isinstance(ddp, DistributedDataParallel)}


def rank_loader(rank: int, n: int, per_rank: int, seed: int, world_size: int = 2) -> DataLoader[Any]:
    """Rank ``rank``'s batches of :func:`vectors`, as a user's loop reads them under torchrun: a
    ``DistributedSampler`` (shuffled with ``seed``) hands each rank its share of every global batch."""
    dataset = TensorDataset(*vectors(n))
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler)


def trainstep_loop(
    rank: int,
    n: int,
    per_rank: int,
    seed: int,
    wrap: str = "plain",
    init_seeds: tuple[int, int] = (0, 0),
    oom_rank: int | None = None,
    oom_call: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The user's own loop: ``step((x, y))`` on each of this rank's batches, one epoch.

    Args:
        wrap: ``"plain"`` (the module as it is: TrainStep copies rank 0's weights to every rank) or
            ``"ddp"`` (the user's own ``DistributedDataParallel``).
        init_seeds: each rank's seed for the model's initial weights.
        oom_rank, oom_call: the ``oom_call``-th micro-step of rank ``oom_rank`` (only) runs out of memory.
    """
    net = mlp(init_seeds[rank])
    model: nn.Module = net
    if wrap == "ddp":
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        model = DistributedDataParallel(net)
    with oom_in_micro_step(rank, oom_rank, oom_call):
        step = autobatch.TrainStep(model, sgd(net), **{"precision": "fp32", "device": "cpu", **options})
        reports = [step((x, y)) for x, y in rank_loader(rank, n, per_rank, seed)]
    return {
        "weights": weights(model),
        "losses": [float(r) for r in reports],
        "micro_batches": [r.micro_batches for r in reports],
        "backoffs": [list(r.backoffs) for r in reports],
        "all_backoffs": step.backoffs,
        "applied": [r.applied for r in reports],
        "probed": step.result.micro_batch if step.result is not None else None,
        "steps": step.steps,
        "still_ddp": isinstance(model, DistributedDataParallel),
    }


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    f.__name__: f
    for f in (
        probe_own_limit,
        fit_tensors,
        fit_indexed,
        fit_oom_on_rank,
        fit_optimizer_oom,
        fit_error_on_rank,
        fit_flaky_data,
        fit_lengths,
        fit_batchnorm_sizes,
        fit_error,
        init_group_as_user,
        fit_user_ddp,
        trainstep_loop,
    )
}


# -- the rank's main -------------------------------------------------------------------------------
class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    scenarios: list[tuple[str, dict[str, Any]]],
    out: str,
    launched: float,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    path = Path(out)
    # Counts every record of autobatch's loggers from the start (the group's initialisation included).
    logs = _Count()
    root = logging.getLogger("autobatch")
    root.addHandler(logs)
    root.setLevel(logging.INFO)
    try:
        results, seconds = [], {"start": time.time() - launched}
        for name, kwargs in scenarios:
            t0 = time.perf_counter()
            results.append(scenario(name)(rank, **kwargs))
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        torch.save({"results": results, "logs": logs.messages, "seconds": seconds}, path / f"rank{rank}.pt")
    except BaseException:
        (path / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def scenario(name: str) -> Callable[..., dict[str, Any]]:
    """A scenario of :data:`SCENARIOS`, or ``"module:function"`` of another test module's ranks."""
    if ":" not in name:
        return SCENARIOS[name]
    module, _, function = name.partition(":")
    found: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module), function)
    return found


# -- the launcher (runs in the test process) -------------------------------------------------------
class LaunchError(RuntimeError):
    """A rank failed, or the ranks did not finish in time (a deadlock)."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the children to inherit, and restore the parent's after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch(
    scenarios: list[tuple[str, dict[str, Any]]],
    tmp: Path,
    *,
    world_size: int = 2,
    timeout: float = 120.0,
) -> list[dict[str, Any]]:
    """Run ``scenarios`` in ``world_size`` spawned ranks; returns each rank's ``{"results", "logs"}``.

    The ranks start with torchrun's environment and no process group: the first autobatch call
    initialises it. The ranks share a probe cache of their own, in ``tmp / "cache"``.

    Raises:
        LaunchError: a rank raised (its traceback is in the message; the others are killed at once
            rather than left waiting in a collective), or the ranks ran past ``timeout`` seconds.
    """
    context = mp.get_context("spawn")
    port = free_port()
    with _env(OMP_NUM_THREADS="1", AUTOBATCH_CACHE_DIR=str(tmp / "cache")):
        procs = [
            context.Process(
                target=_rank_main,
                args=(rank, world_size, port, scenarios, str(tmp), time.time()),
                name=f"autobatch-rank{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
    try:
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs):
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:
                time.sleep(2.0)  # a failing peer may be about to write its own error too
                break
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"deadlock? ranks {[r for r, p in enumerate(procs) if p.is_alive()]} still running "
                    f"after {timeout:.0f} s"
                )
            procs[0].join(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5.0)
    errors = sorted(tmp.glob("rank*.error"))
    if errors or any(p.exitcode != 0 for p in procs):
        details = "\n".join(f"--- {e.name}\n{e.read_text()}" for e in errors)
        codes = [p.exitcode for p in procs]
        raise LaunchError(f"ranks exited with codes {codes}\n{details}")
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
