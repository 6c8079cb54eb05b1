"""On a GPU: does the probe's answer survive real training steps on CUDA's own caching allocator?

For each case the probe runs on CUDA with its allocator capped to a limit; then training runs at the
answer (and at what one step alone allows, where that is larger) for ``--steps`` optimizer steps from a cold
allocator (``empty_cache``, no optimizer state, the weights resident), the cache carried from step to step
as in any training run. The table gives, per step, whether it ran out of memory and the reserved peak. Run by
``benchmarks/gpu.sh``; needs CUDA. Each limit is the case's own plus what the runtime holds in the caching
allocator outside any step (cuBLAS's workspaces: 65 MiB on an H200), measured first: the cap counts it.

Run from the repository root: ``python benchmarks/survive_cuda.py [--steps 6]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autobatch import probe
from autobatch.memory.runtime import held_outside
from autobatch.units import format_bytes
from benchmarks.probe import Encoder
from tests.models import CNN

MiB = 1 << 20


def cases() -> list[tuple[str, nn.Module, tuple[torch.Tensor, torch.Tensor], list[int]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    mlp_data = (torch.randn(8192, 512, generator=g), torch.randint(0, 10, (8192,), generator=g))
    torch.manual_seed(0)
    cnn = CNN(channels=3, size=32, width=64)
    cnn_data = (torch.randn(1024, 3, 32, 32, generator=g), torch.randint(0, 10, (1024,), generator=g))
    torch.manual_seed(0)
    encoder = Encoder()
    tokens = (torch.randint(0, 1000, (1024, 64), generator=g), torch.randint(0, 10, (1024,), generator=g))
    return [
        ("mlp 512-1024-1024, AdamW", mlp, mlp_data, [48, 80]),
        ("cnn, BatchNorm, 32×32", cnn, cnn_data, [72, 100]),
        ("transformer encoder", encoder, tokens, [96, 160]),
    ]


def run_steps(model: nn.Module, data: Any, batch: int, limit: int, steps: int) -> list[tuple[bool, int]]:
    """``steps`` training steps at ``batch`` from a cold allocator capped to ``limit``: (fitted, reserved)."""
    device = torch.device("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    X, y = (t[:batch].to(device) for t in data)
    total = torch.cuda.get_device_properties(device).total_memory
    out: list[tuple[bool, int]] = []
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(limit / total)
    try:
        for _ in range(steps):
            torch.cuda.reset_peak_memory_stats()
            fitted = True
            try:
                for half in (slice(0, batch // 2), slice(batch // 2, batch)):  # two micro-steps, as probed
                    with torch.autocast("cuda", dtype=torch.float16):
                        loss = nn.functional.cross_entropy(model(X[half]), y[half]) * 0.5
                    scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            except torch.OutOfMemoryError:
                fitted = False
            optimizer.zero_grad(set_to_none=True)
            out.append((fitted, torch.cuda.max_memory_reserved()))
            if not fitted:
                break
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        del optimizer
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "needs CUDA"
    started = time.perf_counter()
    print("| model | limit | answer | one step | batch run | steps fitted | reserved peak per step (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, model, data, limits in cases():
        model.cuda()
        outside = held_outside(torch.device("cuda", torch.cuda.current_device()), model.parameters(), "fp16")
        for mib in limits:
            limit = mib * MiB + outside
            result = probe(
                model,
                data,
                memory_limit=limit,
                cache=False,
                precision="fp16",
                optimizer=torch.optim.AdamW(model.parameters()),
            )
            batches = [result.micro_batch]
            if result.single_step_batch and result.single_step_batch > result.micro_batch:
                batches.append(result.single_step_batch)
            for batch in batches:
                steps = run_steps(model, data, batch, limit, args.steps)
                fitted = sum(ok for ok, _ in steps)
                peaks = " ".join(f"{p / MiB:.0f}" + ("" if ok else " OOM") for ok, p in steps)
                print(
                    f"| {name} | {mib} MiB + {format_bytes(outside)} | {result.micro_batch} "
                    f"| {result.single_step_batch} "
                    f"| {batch} | {fitted}/{args.steps} | {peaks} |"
                )
        model.cpu()
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s on {torch.cuda.get_device_name()}",
        f"(torch {torch.__version__})",
    )


if __name__ == "__main__":
    main()
