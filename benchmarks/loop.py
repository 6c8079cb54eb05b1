"""Training-loop overhead: ``autobatch.fit``'s epoch and a user's loop of ``autobatch.TrainStep`` calls,
against a hand-written accumulation loop.

All three run the same model, data, micro-batch, accumulation, precision and optimizer (AdamW, lr 1e-3),
on the CPU, without a memory limit (no emulation), alternating in one process so that all see the same
machine state. The hand-written loop is the classic one (autocast, ``scaler.scale(loss /
accumulation).backward()``, step every N micro-batches), fed by slicing the tensors directly, i.e. with no
DataLoader overhead either; the TrainStep loop is fed the same slices, one ``step((x, y))`` call per
optimizer step. Figures, not pass/fail: the project's target is a wall-time ratio ≤ 1.03.

Run from the repository root: ``python benchmarks/loop.py [--rounds 5] [--cases 1] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import autobatch
from autobatch.demo import DigitsCNN, load_digits_data


@dataclass
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    data: tuple[torch.Tensor, torch.Tensor]
    micro: int
    target: int
    precision: str


DEVICE = "cpu"


def hand_written_epoch(case: Case, model: nn.Module, seed: int) -> float:
    """The classic loop; returns its wall time in seconds."""
    X, y = case.data
    model.to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.precision]
    scaler = torch.amp.GradScaler(DEVICE, enabled=case.precision == "fp16")
    accumulation = -(-case.target // case.micro)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    model.train()
    started = time.perf_counter()
    for start in range(0, len(y), case.target):
        step = order[start : start + case.target]
        xs, ys = X[step].to(DEVICE, non_blocking=True), y[step].to(DEVICE, non_blocking=True)
        for i in range(0, len(step), case.micro):
            with torch.autocast(DEVICE, dtype=dtype, enabled=case.precision != "fp32"):
                loss = nn.functional.cross_entropy(model(xs[i : i + case.micro]), ys[i : i + case.micro])
            scaler.scale(loss / accumulation).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def trainstep_epoch(case: Case, model: nn.Module, seed: int) -> float:
    """The user's own loop around :class:`autobatch.TrainStep`: the hand-written loop's order and batches,
    one call per optimizer step; returns its wall time in seconds (the first call's setup included)."""
    X, y = case.data
    model.to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = autobatch.TrainStep(
        model, optimizer, micro_batch=case.micro, precision=case.precision, device=DEVICE
    )
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    model.train()
    started = time.perf_counter()
    for start in range(0, len(y), case.target):
        indices = order[start : start + case.target]
        step((X[indices].to(DEVICE, non_blocking=True), y[indices].to(DEVICE, non_blocking=True)))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def autobatch_epoch(case: Case, model: nn.Module, seed: int) -> float:
    result = autobatch.fit(
        model,
        case.data,
        target_batch=case.target,
        micro_batch=case.micro,
        precision=case.precision,
        device=DEVICE,
        seed=seed,
        progress=False,
    )
    return result.train_seconds


def cases() -> list[Case]:
    digits = load_digits_data()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8192, 512, generator=g)
    y = torch.randint(0, 10, (8192,), generator=g)

    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )

    return [
        Case("digits CNN, bf16, 11×3=32", DigitsCNN, digits.train, 11, 32, "bf16"),
        Case("digits CNN, fp32, 8×4=32", DigitsCNN, digits.train, 8, 32, "fp32"),
        Case("MLP 512-1024-1024, fp32, 64×4=256", mlp, (X, y), 64, 256, "fp32"),
    ]


CONTENDERS: dict[str, Callable[[Case, nn.Module, int], float]] = {
    "hand": hand_written_epoch,
    "fit": autobatch_epoch,
    "trainstep": trainstep_epoch,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", type=int, default=None, help="run only the first N cases (quick: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on shared CPUs)")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (the GPU then runs fp16 where a case says bf16)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*BatchNorm")  # expected here: accumulation > 1
    rows = []
    for case in cases()[: args.cases]:
        if DEVICE == "cuda" and case.precision == "bf16":
            case.precision = "fp16"  # the GPU's mixed precision, with the GradScaler
        samples = len(case.data[1])
        # Warm every path once (allocator, kernels) before timing.
        for run in CONTENDERS.values():
            torch.manual_seed(0)
            run(case, case.make_model(), 0)
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for r in range(args.rounds):
            # Each round runs all three back to back, in a rotating order, so that none always goes first.
            names = list(CONTENDERS)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                torch.manual_seed(r)
                times[name].append(CONTENDERS[name](case, case.make_model(), r))
        hand = times["hand"]
        row: dict[str, Any] = {"case": case.name, "hand_s": statistics.median(hand)}
        for name in ("fit", "trainstep"):
            ours = times[name]
            median = statistics.median(ours)
            row |= {
                f"{name}_s": median,
                # Each round pairs the loops back to back; the median of the paired ratios cancels the
                # slow drift of a shared machine better than a ratio of medians.
                f"{name}_ratio": statistics.median(b / a for a, b in zip(hand, ours, strict=True)),
                f"{name}_ratio_of_best": min(ours) / min(hand),
                f"{name}_samples_s": samples / median,
            }
        row["hand_samples_s"] = samples / row["hand_s"]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"median of {args.rounds} alternating rounds, one epoch each, on {DEVICE}, "
        f"torch threads = {args.threads}\n"
    )
    print(
        "| case | hand-written (s) | fit (s) | fit ratio | fit ratio of best | TrainStep (s) "
        "| TrainStep ratio | TrainStep ratio of best | hand samples/s | fit samples/s | TrainStep samples/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['case']} | {row['hand_s']:.3f} | {row['fit_s']:.3f} | {row['fit_ratio']:.3f} | "
            f"{row['fit_ratio_of_best']:.3f} | {row['trainstep_s']:.3f} | {row['trainstep_ratio']:.3f} | "
            f"{row['trainstep_ratio_of_best']:.3f} | {row['hand_samples_s']:,.0f} | "
            f"{row['fit_samples_s']:,.0f} | {row['trainstep_samples_s']:,.0f} |"
        )
    print("\nratio: median over rounds of (contender / hand-written) wall time; target ≤ 1.03")


if __name__ == "__main__":
    main()
