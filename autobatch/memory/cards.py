"""The GPUs a prediction can be made for: their memory, and what CUDA keeps of it for itself.

``autobatch.predict(..., gpu="T4")`` needs, for the card named:

* ``total``: what ``torch.cuda.get_device_properties(i).total_memory`` reports (``cudaDeviceProp
  .totalGlobalMem``, in bytes). Reports for one card differ by up to 0.2 % with the driver and ECC (a T4 is
  reported at 15079, 15095, 15102 and 15109 MiB): the result names the figure it used;
* ``sm`` (compute capability, major × 10 + minor): which fused attention kernel PyTorch picks
  (:mod:`autobatch.step.cudakernels`) and how large the cuBLAS workspace is;
* ``sms`` (multiprocessors): a bare CUDA context grows with them.

What CUDA holds *outside* the caching allocator (the context: driver state and the kernels loaded lazily) is
not the allocator's to use: the allocator's budget is the total less the context (:attr:`Card.budget`). What
it holds *inside* the allocator before the first step is allocated (the cuBLAS workspaces) is placed on the
emulated device as resident blocks (:func:`cublas_workspaces`).

Every figure below carries its source in a comment; none was measured by autobatch (no GPU was at hand):
``benchmarks/gpu.sh`` measures the context and the workspaces on a card that is lent. Pure: no torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from autobatch.errors import UsageValueError
from autobatch.units import format_bytes

__all__ = [
    "CARDS",
    "CONTEXT_LARGE",
    "CONTEXT_SMALL",
    "CUBLASLT_WORKSPACE",
    "CUBLAS_WORKSPACE",
    "CUBLAS_WORKSPACE_SM90",
    "WORKSPACE_HANDLES",
    "Card",
    "card",
    "cublas_workspaces",
]

MiB = 1 << 20

# -- cuBLAS workspaces, inside the caching allocator ---------------------------------------------------
# pytorch/pytorch aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize(): the default is
#   sm90 ? 4096 * 8 * 1024 : 4096 * 1024 * 2 + 16 * 1024 * 8   (":4096:8" on Hopper 9.0, ":4096:2:16:8" else)
# and CUBLAS_WORKSPACE_CONFIG=":SIZE:COUNT[:SIZE:COUNT...]" (KiB) overrides it (their sum). getNewWorkspace()
# allocates it through c10::cuda::CUDACachingAllocator, once per (cuBLAS handle, stream).
CUBLAS_WORKSPACE = 4096 * 1024 * 2 + 16 * 1024 * 8  # 8,519,680 B
CUBLAS_WORKSPACE_SM90 = 4096 * 8 * 1024  # 33,554,432 B: compute capability 9.0 exactly
# The same file, parseCUDABlasLtWorkspaceSize(): cuBLASLt's own workspace, CUBLASLT_WORKSPACE_SIZE KiB,
# default 1024 (#73328), allocated through the caching allocator per (handle, stream) too, unless
# TORCH_CUBLASLT_UNIFIED_WORKSPACE=1 shares cuBLAS's (getCUDABlasLtWorkspace()).
CUBLASLT_WORKSPACE = 1024 * 1024
# Handles are per thread (DeviceThreadHandlePool, a thread-local PoolWindow), and autograd runs a CUDA
# device's backward on a thread of its own: a training step uses two handles, the forward's and the
# backward's. An ESTIMATE from the source; benchmarks/gpu.sh measures it (the drop of memory_allocated()
# when torch._C._cuda_clearCublasWorkspaces() runs, over the workspace size).
WORKSPACE_HANDLES = 2

# -- the CUDA context, outside the caching allocator (ESTIMATES from others' reports) ------------------------
# pytorch/pytorch#107667 (ptrblck, 2023): "the currently used ~300MB" with lazy module loading (CUDA >= 11.7),
#   ">1000MB" before it;
# pytorch/pytorch#109888 (ptrblck, 2023): "around 400MB if CUDA >= 11.7 is used and lazy module loading
#   enabled";
# pytorch/pytorch#86509 (syed-ahmed, 2022): total - free = 287,047,680 B after one tensor with lazy loading;
# ggml-org/llama.cpp#23604: a bare primary context grows with the SM count (107 MiB on a 34-SM RTX 4060 Ti,
#   555 MiB on a 188-SM RTX PRO 6000).
# A training step also loads cuBLAS's and cuDNN's kernels lazily: the larger side of these reports.
CONTEXT_SMALL = 384 * MiB  # cards with fewer than 100 multiprocessors
CONTEXT_LARGE = 512 * MiB  # cards with 100 or more


@dataclass(frozen=True)
class Card:
    """One GPU model: its memory as CUDA reports it, its compute capability and multiprocessors.

    A card the table lacks (or one measured) is made the same way and passed as ``gpu=`` itself:
    ``Card("V100-32GB", 34_089_730_048, 70, 80, "measured", context_bytes=300 << 20)``.

    Attributes:
        name: the table's name (``"A100-80GB"``).
        total: ``total_memory`` in bytes.
        sm: compute capability, major × 10 + minor (75 for 7.5).
        sms: streaming multiprocessors.
        source: where ``total``, ``sm`` and ``sms`` come from.
        context_bytes: the CUDA context's bytes where measured; ``None``: the table's estimate.
    """

    name: str
    total: int
    sm: int
    sms: int
    source: str
    context_bytes: int | None = None

    def __post_init__(self) -> None:
        for field, value in (("total", self.total), ("sm", self.sm), ("sms", self.sms)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageValueError(
                    f"Expected the card's `{field}` to be a positive int, but got {value!r}."
                )
        if not (isinstance(self.name, str) and self.name and isinstance(self.source, str) and self.source):
            raise UsageValueError(
                f"Expected the card's `name` and `source` to be text, but got {self.name!r}."
            )
        context = self.context_bytes
        if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 0):
            raise UsageValueError(
                f"Expected the card's `context_bytes` to be an int ≥ 0, but got {context!r}."
            )
        if self.context >= self.total:
            raise UsageValueError(
                f"Expected the card's CUDA context ({self.context} B) below its memory ({self.total} B)."
            )

    @property
    def context(self) -> int:
        """The CUDA context's bytes outside the caching allocator: measured, or the table's estimate."""
        if self.context_bytes is not None:
            return self.context_bytes
        return CONTEXT_LARGE if self.sms >= 100 else CONTEXT_SMALL

    @property
    def budget(self) -> int:
        """What the caching allocator can reserve: the total less the context (the workspaces are inside)."""
        return self.total - self.context

    def describe(self) -> str:
        """``'T4 (14.74 GiB, compute capability 7.5)'``."""
        return f"{self.name} ({format_bytes(self.total)}, compute capability {self.sm // 10}.{self.sm % 10})"


_TQ = "deviceQuery output in thamada/nvidia-smi"
_PRINTOUT = "torch.cuda.get_device_properties printout"
_CARDS = [
    # deviceQuery "Global Memory 15095 MBytes", Tesla T4 on Colab, driver 12.4
    # (sylvia-ymlin/cuda-kernels-from-scratch, README.md): 15095 MiB, 40 multiprocessors, capability 7.5.
    Card("T4", 15095 * MiB, 75, 40, "deviceQuery on Colab in sylvia-ymlin/cuda-kernels-from-scratch"),
    # gls/L4_deviceQuery.py: 22478 MBytes (23570219008 bytes), (058) Multiprocessors, 8.9, driver 12.4.
    Card("L4", 23_570_219_008, 89, 58, f"{_TQ}, gls/L4_deviceQuery.py"),
    # _CudaDeviceProperties(name='NVIDIA A10G', major=8, minor=6, total_memory=22587MB,
    # multi_processor_count=80), in the torchcodec CUDA decoding tutorial: 22587 MiB.
    Card("A10G", 22587 * MiB, 86, 80, f"{_PRINTOUT} in torchcodec's CUDA tutorial"),
    # gls/RTX3090_deviceQuery.py: 24154 MBytes (25327697920 bytes), (082) Multiprocessors, 8.6, driver 12.6.
    Card("RTX-3090", 25_327_697_920, 86, 82, f"{_TQ}, gls/RTX3090_deviceQuery.py"),
    # gls/RTX4090_deviceQuery.py: 24210 MBytes (25386352640 bytes), (128) Multiprocessors, 8.9, driver 12.4.
    Card("RTX-4090", 25_386_352_640, 89, 128, f"{_TQ}, gls/RTX4090_deviceQuery.py"),
    # _gpuDeviceProperties(name='A100-SXM4-40GB', major=8, minor=0, total_memory=40536MB,
    # multi_processor_count=108), in PaddlePaddle's get_device_properties docstring (the same CUDA field).
    Card("A100-40GB", 40536 * MiB, 80, 108, "A100-SXM4-40GB printout in PaddlePaddle's docs"),
    # gls/A100SXMx4_deviceQuery.py: "NVIDIA A100-SXM4-80GB", 81158 MBytes (85100068864 bytes), (108), 8.0.
    Card("A100-80GB", 85_100_068_864, 80, 108, f"{_TQ}, gls/A100SXMx4_deviceQuery.py (SXM4)"),
    # nvsim/L40S_deviceQuery.py: 45589 MBytes (47803596800 bytes), 142 Multiprocessors, 8.9.
    Card("L40S", 47_803_596_800, 89, 142, f"{_TQ}, nvsim/L40S_deviceQuery.py"),
    # nvsim/H100SXMx8_deviceQuery.py: "NVIDIA H100 80GB HBM3", 81106 MBytes (85045477376 bytes), (132), 9.0.
    Card("H100-80GB", 85_045_477_376, 90, 132, f"{_TQ}, nvsim/H100SXMx8_deviceQuery.py (SXM5)"),
    # gls/H100NVLx2_deviceQuery.py: "NVIDIA H100 NVL", 95235 MBytes (99861594112 bytes), (132), 9.0.
    Card("H100-NVL", 99_861_594_112, 90, 132, f"{_TQ}, gls/H100NVLx2_deviceQuery.py"),
    # _CudaDeviceProperties(name='NVIDIA H200', major=9, minor=0, total_memory=143156MB,
    # multi_processor_count=132), in a Modal deployment script's comment (skywork_r1v.py): 143156 MiB.
    # MEASURED by benchmarks/gpu.sh on an H200 (driver 580.159.04, torch 2.11.0+cu130, 2026-12-04):
    # total_memory 150109880320 B, 132 SMs, 9.0; total - free - reserved after a BERT-base training step (the
    # context with the kernels it loaded) 785186816 B (748.81 MiB); the estimate for 132 SMs said 512 MiB.
    Card("H200", 150109880320, 90, 132, "measured by benchmarks/gpu.sh", context_bytes=785186816),
]
CARDS: Mapping[str, Card] = {c.name: c for c in _CARDS}
"""The cards :func:`card` knows, by name."""

_ALIASES = {"A100": "A100-80GB", "H100": "H100-80GB", "RTX3090": "RTX-3090", "RTX4090": "RTX-4090"}


def _key(name: str) -> str:
    """A card name without vendor words, spaces, dashes or form factors: ``'NVIDIA A100-SXM4-80GB'`` is
    ``'A10080GB'``, as is ``'a100 80gb'``."""
    text = re.sub(r"\b(NVIDIA|GEFORCE|TESLA|SXM\d?|PCIE|HBM3E?)\b", " ", name.upper())
    return re.sub(r"[^A-Z0-9]", "", text)


_BY_KEY = {_key(name): name for name in CARDS} | {_key(k): v for k, v in _ALIASES.items()}


def card(name: str | Card) -> Card:
    """The card called ``name``: a table name (``"A100-80GB"``), the name CUDA reports (``"NVIDIA
    A100-SXM4-80GB"``) or a short alias (``"a100"`` is the 80 GB one, ``"h100"`` the 80 GB SXM); a
    :class:`Card` is itself.

    Raises:
        UsageValueError: the name is not in the table (the message lists the names it knows).
    """
    if isinstance(name, Card):
        return name
    if not isinstance(name, str):
        raise UsageValueError(f"Expected `gpu` to be a card's name such as 'T4', but got {name!r}.")
    found = _BY_KEY.get(_key(name))
    if found is None:
        raise UsageValueError(
            f"Expected `gpu` to be one of {', '.join(CARDS)}, but got {name!r}. For another card, pass an "
            "autobatch.memory.cards.Card with its memory, capability and multiprocessors."
        )
    return CARDS[found]


def _workspace_config(environ: Mapping[str, str]) -> int | None:
    """``CUBLAS_WORKSPACE_CONFIG``'s size in bytes (the sum of its ``:SIZE:COUNT`` pairs, in KiB), if set
    and readable (PyTorch warns and takes its default otherwise)."""
    text = environ.get("CUBLAS_WORKSPACE_CONFIG")
    pairs = re.findall(r":([0-9]+):([0-9]+)", text or "")
    return sum(int(size) * 1024 * int(count) for size, count in pairs) if pairs else None


def cublas_workspaces(sm: int, environ: Mapping[str, str] | None = None) -> tuple[int, ...]:
    """The blocks the caching allocator holds for cuBLAS once a training step has run on a card of
    compute capability ``sm``: a cuBLAS and a cuBLASLt workspace per handle (see the comments above), as
    the environment's ``CUBLAS_WORKSPACE_CONFIG``, ``CUBLASLT_WORKSPACE_SIZE`` and
    ``TORCH_CUBLASLT_UNIFIED_WORKSPACE`` set them.

    Example:
        >>> cublas_workspaces(75, {})
        (8519680, 1048576, 8519680, 1048576)
    """
    environ = os.environ if environ is None else environ
    size = _workspace_config(environ) or (CUBLAS_WORKSPACE_SM90 if sm == 90 else CUBLAS_WORKSPACE)
    blocks = [size]
    if environ.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "").lower() not in ("1", "true", "yes", "on"):
        lt = environ.get("CUBLASLT_WORKSPACE_SIZE", "")
        blocks.append(int(lt) * 1024 if lt.isdigit() else CUBLASLT_WORKSPACE)
    return tuple(b for _ in range(WORKSPACE_HANDLES) for b in blocks if b > 0)
