"""Probe exactness and cost, for training that survives: ``autobatch.probe`` against an independent judge.

A micro-batch fits when training at it survives (``autobatch/memory/survival.py``): three steps from a cold
start (weights only; the first step makes the gradients and the optimizer state) and three from steady state
(weights and optimizer state packed), the allocator's cache carried from each step to the next. The judge
runs those six steps for real, on an emulated device that carries its state from step to step, for every
batch from 1 up to the first that does not survive: the largest below it is the true maximum (a hole above
the first failure does not count, as a plan whose micro-batches vary below the answer needs them all).
Beyond :data:`EXHAUSTIVE` batches the judge takes every batch near the answer and strides below.

For each case (a model, its data, an optimizer and a memory limit) the table gives the answer of one step
alone (what a probe of single steps answered: the largest batch whose one step from steady state, packed,
fits), the true surviving maximum, the probe's answer, its steps, out-of-memory errors and samples of
training work, the steps after which the allocator's state repeats at the answer, the step that decides
it, and with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: what the default probe predicted it would
buy, and what a probe under that setting answers. Figures, not pass/fail: the project's targets are an
answer that survives and is at least 0.99 of the true maximum, in at most 6 steps and 1 OOM, with at most
3 × the maximum in samples.

Two devices are emulated on the CPU: ``ideal`` caps live tensor bytes, ``allocator`` caps reserved memory
through the model of CUDA's caching allocator. With ``--device cuda`` the same models run on a GPU whose
allocator is capped to each limit (``benchmarks/gpu.sh``), where the judge runs on the real allocator.

Run from the repository root: ``python benchmarks/probe.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autobatch import NoBatchFitsError, probe
from autobatch.memory.device import DeviceMemory
from autobatch.memory.runtime import held_outside
from autobatch.step.stepper import Stepper
from autobatch.step.transaction import run_step
from autobatch.units import format_bytes
from tests.models import CNN, MLP, case

EXHAUSTIVE = 320
"""The judge tries every batch from 1 up to this; above it, every batch within 64 of the answer and a
stride of 8 below."""

STEPS = 3
"""Consecutive steps the judge runs from each start."""


@dataclass
class Case:
    """A model, its data, how to build its optimizer, and the limits to probe it under."""

    name: str
    make: Callable[[], nn.Module]
    data: Any
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    limits: tuple[int, ...]
    mode: str  # "ideal" or "allocator"


MiB, KiB = 1 << 20, 1 << 10


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def _tensors(n: int, shape: tuple[int, ...], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return factory()

    return make


class Encoder(nn.Module):
    """A small transformer encoder classifier on fixed-length token ids."""

    def __init__(self, vocab: int = 1000, width: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def cases(quick: bool) -> list[Case]:
    tokens = (
        torch.randint(0, 1000, (1024, 64), generator=torch.Generator().manual_seed(0)),
        torch.randint(0, 10, (1024,), generator=torch.Generator().manual_seed(1)),
    )
    wide = _seeded(
        lambda: nn.Sequential(
            nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
    )
    heavy = _seeded(
        lambda: nn.Sequential(
            nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
    )
    found = [
        Case(
            "mlp", _seeded(lambda: case("mlp").model), case("mlp").data, adam, (148 * KiB, 190 * KiB), "ideal"
        ),
        Case(
            "cnn",
            _seeded(lambda: case("cnn").model),
            case("cnn").data,
            adam,
            (660 * KiB, 2345 * KiB),
            "ideal",
        ),
        Case(
            "transformer",
            _seeded(lambda: case("transformer").model),
            case("transformer").data,
            adam,
            (4352 * KiB,),
            "ideal",
        ),
        Case("mlp, optimizer-heavy", heavy, _tensors(1024, (16,), 10), adam, (6912 * KiB,), "ideal"),
        Case(
            "mlp 512-1024-1024, AdamW",
            wide,
            _tensors(2048, (512,), 10),
            adamw,
            (44 * MiB, 48 * MiB, 80 * MiB),
            "allocator",
        ),
        Case(
            "cnn, BatchNorm, 32×32",
            _seeded(lambda: CNN(channels=3, size=32, width=64)),
            _tensors(512, (3, 32, 32), 10),
            adam,
            (28 * MiB, 72 * MiB, 100 * MiB),
            "allocator",
        ),
        Case("transformer encoder", _seeded(Encoder), tokens, adamw, (48 * MiB, 96 * MiB), "allocator"),
        Case(
            "mlp 256-2048-2048",
            _seeded(lambda: MLP(in_features=256, hidden=2048)),
            _tensors(1024, (256,), 10),
            adam,
            (118 * MiB,),
            "allocator",
        ),
    ]
    if quick:
        return [c for c in found if c.name in ("mlp", "mlp 512-1024-1024, AdamW")]
    return found


# -- the judge: real consecutive steps, the allocator carried ------------------------------------------------


class Judge:
    """Runs real training steps on an emulated device whose state carries from step to step."""

    def __init__(self, c: Case, limit: int, device: str) -> None:
        self.c, self.model = c, c.make().to(device)
        self.optimizer = c.optimizer(self.model)
        self.memory = DeviceMemory(torch.device(device), limit, c.mode)
        self.stepper = Stepper(self.model, self.optimizer, self.memory, "fp32")
        self.steps = 0

    def _step(self, batch: int) -> bool:
        X, y = self.c.data if isinstance(self.c.data, tuple) else (None, None)
        if X is not None:
            pieces = [((X[:batch], y[:batch]), 0.5)] * 2
        else:  # a dataset: its first samples, collated
            from autobatch.step.data import as_source

            source = as_source(self.c.data)
            piece = source.worst_case(batch)
            pieces = [(piece, 0.5)] * 2
        self.steps += 1
        return run_step(self.stepper, lambda: pieces).fitted

    def survives(self, batch: int) -> bool:
        """Three steps from a cold start, then three from steady state (state made, packed)."""
        self.stepper.discard_step()
        self.optimizer.state.clear()
        with self.memory.carried(self.stepper.weight_tensors()):
            if not all(self._step(batch) for _ in range(STEPS)):
                return False
        with self.memory.carried(self.stepper.state_tensors()):
            return all(self._step(batch) for _ in range(STEPS))

    def one_step(self, batch: int) -> bool:
        """One step from steady state, packed: what a probe of single steps tried."""
        if not self.optimizer.state:
            self.stepper.discard_step()
            with self.memory.carried(self.stepper.weight_tensors()):
                self._step(1)
        with self.memory.carried(self.stepper.state_tensors()):
            return self._step(batch)

    def maximum(self, test: Callable[[int], bool], hint: int, size: int) -> tuple[int, bool]:
        """The largest batch below the first that fails ``test`` (exhaustive up to :data:`EXHAUSTIVE`,
        then strided below the answer); whether every batch below it was tried."""
        top = min(size, max(EXHAUSTIVE, hint + 64))
        batches = list(range(1, top + 1))
        exhaustive = top <= EXHAUSTIVE
        if not exhaustive:
            near = set(range(max(1, hint - 64), top + 1))
            batches = [b for b in batches if b in near or b % 8 == 0 or b == 1]
        last = 0
        for batch in batches:
            if not test(batch):
                return last if exhaustive or batch in near else _refine(test, last, batch), exhaustive
            last = batch
        return last, exhaustive


def _refine(test: Callable[[int], bool], good: int, bad: int) -> int:
    """The batch below the first failure between a batch that passed and one that failed, one by one."""
    for batch in range(good + 1, bad):
        if not test(batch):
            return batch - 1
    return bad - 1


@contextlib.contextmanager
def alloc_conf(text: str | None) -> Iterator[None]:
    saved = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if text is None:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    else:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = text
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        else:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = saved


def run_probe(c: Case, limit: int, device: str, conf: str | None = None) -> dict[str, Any]:
    model = c.make().to(device)
    options = {"memory_limit": limit, "precision": "fp32", "device": device, "cache": False}
    if device == "cpu":
        options["emulation"] = c.mode
    gc.collect()
    with alloc_conf(conf):
        started = time.perf_counter()
        result = probe(model, c.data, optimizer=c.optimizer(model), **options)
        seconds = time.perf_counter() - started
    return {
        "micro": result.micro_batch,
        "steps": result.optimizer_steps,
        "ooms": result.ooms,
        "samples": sum(t.batch * (2 if t.role == "cold" else 1) for t in result.trials),
        "seconds": seconds,
        "trials": [
            f"{'' if t.fitted else '-'}{t.batch}{'' if t.role == 'verdict' else t.role[0]}"
            + ("m" if t.case == "mixed" else "")
            for t in result.trials
        ],
        "single_step": result.single_step_batch,
        "fixed_point": result.fixed_point_steps,
        "decided_by": result.decided_by,
        "expandable_predicted": result.expandable_batch,
    }


def measure(c: Case, limit: int, device: str) -> dict[str, Any]:
    started = time.perf_counter()
    new = run_probe(c, limit, device)
    size = len(c.data[0]) if isinstance(c.data, tuple) else len(c.data)
    judge = Judge(c, limit, device)
    true_max, exhaustive = judge.maximum(judge.survives, new["micro"], size)
    single, _ = judge.maximum(judge.one_step, new["single_step"] or new["micro"], size)
    row = {
        "model": c.name,
        "mode": c.mode if device == "cpu" else "cuda",
        "limit": limit,
        "single_step": single,
        "true_max": true_max,
        "exhaustive": exhaustive,
        "new": new,
        "survives": judge.survives(new["micro"]),
        "judge_steps": judge.steps,
    }
    if c.mode == "allocator":
        try:
            row["expandable"] = run_probe(c, limit, device, "expandable_segments:True")
        except NoBatchFitsError:  # expandable segments' 20 MiB pages can need more than the segments
            row["expandable"] = {"micro": 0}
    row["seconds"] = time.perf_counter() - started
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | device | limit | one step | survives (judge) | probe | survives? | steps | OOMs | samples "
        "| fixed point | decided by | expandable: predicted | expandable: probe "
        "| trials (−: OOM; c cold, s steady) |",
        "|---|---|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        new = r["new"]
        exp = r.get("expandable")
        ratio = new["samples"] / max(r["true_max"], 1)
        true_max = f"{r['true_max']}{'' if r['exhaustive'] else '*'}"
        lines.append(
            f"| {r['model']} | {r['mode']} | {format_bytes(r['limit'])} | {r['single_step']} "
            f"| {true_max} | {new['micro']} | {'yes' if r['survives'] else 'NO'} "
            f"| {new['steps']} | {new['ooms']} | {new['samples']} ({ratio:.1f}×) "
            f"| {new['fixed_point'] or '–'} "
            f"| {new['decided_by'] or '–'} | {new['expandable_predicted'] or '–'} "
            f"| {exp['micro'] if exp else '–'} | {' '.join(new['trials'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu", help="cpu (emulated) or cuda")
    parser.add_argument("--quick", action="store_true", help="two cases only")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    # On CUDA the cap also counts what the runtime holds outside any step (cuBLAS's workspaces, 65 MiB on
    # an H200): each case's limit is its own plus that, measured before any model is on the card.
    outside = held_outside(torch.device("cuda"), [], "fp32") if args.device == "cuda" else 0
    for c in cases(args.quick):
        if args.device == "cuda" and c.mode == "ideal":
            continue
        for base in c.limits:
            limit = base + outside
            rows.append(measure(c, limit, args.device))
            print(f"{c.name} @ {format_bytes(limit)}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps({"rows": rows, "seconds": time.perf_counter() - started}, indent=2))
        return
    print(markdown(rows))
    ok = [r for r in rows if r["survives"] and r["new"]["micro"] >= 0.99 * r["true_max"]]
    print(
        f"\n{len(ok)}/{len(rows)} answers survive and are at least 0.99 of the true maximum; at most "
        f"{max(r['new']['steps'] for r in rows)} steps, {max(r['new']['ooms'] for r in rows)} OOMs and "
        f"{max(r['new']['samples'] / max(r['true_max'], 1) for r in rows):.2f} × the maximum in samples. "
        "(*: the judge strided below the answer)"
    )
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s (torch {torch.__version__}, {args.threads} thread(s))"
    )


if __name__ == "__main__":
    main()
