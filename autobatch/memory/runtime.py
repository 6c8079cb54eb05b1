"""What a CUDA process holds in the caching allocator outside any training step's tensors.

``torch.cuda.set_per_process_memory_fraction`` caps everything the caching allocator reserves, and not
only the step's tensors: PyTorch allocates each cuBLAS handle's workspace through it, once per handle and
stream (two handles in training: the forward's thread and autograd's; 32 MiB each on Hopper, about 8 MiB
before it, plus cuBLASLt's 1 MiB: :func:`autobatch.memory.cards.cublas_workspaces`), and anything else the
program keeps on the card (a dataset moved there whole, another model) counts too. A step's trace never
sees those blocks, so the probe's replay on CUDA holds its steps to the cap less what is held outside
them, measured here once the workspaces exist. An emulated device holds nothing outside: there it is 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from autobatch.memory.device import tensor_bytes
from autobatch.memory.ledger import BLOCK_BYTES

__all__ = ["held_outside"]


def held_outside(device: torch.device, known: Iterable[torch.Tensor], precision: str) -> int:
    """Bytes the caching allocator of CUDA ``device`` has allocated in blocks none of ``known`` own.

    cuBLAS's workspaces are made first (a matmul forward and backward, and a linear layer under the
    precision's autocast, which takes cuBLASLt's path), as a step's first matmul would make them.
    """
    if device.type != "cuda":
        return 0
    try:
        _make_workspaces(device, precision)
    except torch.OutOfMemoryError:  # a cap below them (a test's): the trials will say that nothing fits
        torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    own = tensor_bytes((t for t in known if t.device == device), block=BLOCK_BYTES)
    return max(0, torch.cuda.memory_allocated(device) - own)


def _make_workspaces(device: torch.device, precision: str) -> None:
    """Run the cuBLAS calls a training step makes first, so that their handles' workspaces exist."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    weight = torch.ones(16, 16, device=device, requires_grad=True)
    bias = torch.zeros(16, device=device, requires_grad=True)
    inputs = torch.ones(16, 16, device=device)
    with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
        out = torch.nn.functional.linear(inputs, weight, bias) @ weight
    out.float().sum().backward()  # autograd's thread: its own handle, its own workspace
