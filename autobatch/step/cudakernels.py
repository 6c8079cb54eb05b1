"""The kernels a CUDA card runs, on the CPU: CUDA's autocast op lists, its fused attention and dropout.

A prediction for a GPU (:mod:`autobatch.probing.prediction`) runs the training step on fake CPU tensors, and
the CPU's kernels are not the GPU's: CPU autocast keeps ``layer_norm`` and ``softmax`` in half precision where
CUDA's runs them in float32, attention runs on the math path (its ``B·H·L²`` scores held for backward) where
CUDA picks a fused kernel, and dropout keeps a float noise tensor where CUDA keeps a bool mask. While
:func:`cuda_kernels` is entered, Python kernels registered through ``torch.library`` apply CUDA's rules
instead, at the dispatcher, where every op is seen (a ``TorchFunctionMode`` only sees the outermost call of a
Python composite such as ``F.multi_head_attention_forward``):

* at the ``AutocastCPU`` key, the ops whose CUDA autocast policy differs from the CPU's, each with CUDA's
  (the lists of ``aten/src/ATen/autocast_mode.h``: ``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``,
  ``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``, ``AT_FORALL_PROMOTE``), and
  a fallthrough for the ops only the CPU casts (CUDA registers nothing for them). Like autocast's own kernels
  they sit above autograd, so the casts are recorded and their backward allocates as on the GPU, and they
  redispatch with autocast excluded;
* ``scaled_dot_product_attention`` routed to the kernel CUDA's ``select_sdp_backend`` picks on the card
  (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``: flash, then memory-efficient, then math; where
  a build prefers cuDNN's attention on Hopper, it is taken as flash), whose meta kernels run on fake tensors,
  forward and backward;
* ``dropout`` in training as CUDA's fused ``native_dropout`` (a bool mask).

Leaving the block removes every kernel (``Library._destroy``). The registrations are process-wide: one
block at a time (a lock), and no CPU training in another thread of the process meanwhile. Not modelled:
cuDNN's convolution workspaces, and the scratch buffers of fused attention's backward.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["FALLTHROUGH", "FP32", "FP32_SET_OPT_DTYPE", "LOWER", "PROMOTE", "KernelPolicy", "cuda_kernels"]

_aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)
_NO_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_LOCK = threading.Lock()

# Registered at AutocastCUDA and not at AutocastCPU (torch._C._dispatch_has_kernel_for_dispatch_key), with
# their policy in autocast_mode.h; tests/step/test_cudakernels.py checks the lists against the dispatcher.
LOWER = (
    "addmv", "addr", "mv", "einsum", "chain_matmul", "linalg_multi_dot", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "convolution",
    "_convolution", "_scaled_dot_product_flash_attention",
)  # fmt: skip
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "dist", "pdist", "renorm", "logsumexp", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
    "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)  # fmt: skip
FP32_SET_OPT_DTYPE = (
    "softmax.int",
    "log_softmax.int",
    "cumsum",
    "cumprod",
    "sum",
    "sum.dim_IntList",
    "prod",
    "prod.dim_int",
    "linalg_vector_norm",
    "linalg_matrix_norm",
    "linalg_matrix_norm.str_ord",
)  # fmt: skip  (prod: float32 by casting on the CPU, by dtype= on CUDA)
FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
PROMOTE = (
    "addcdiv",
    "addcmul",
    "atan2",
    "bilinear",
    "cross",
    "dot",
    "vdot",
    "index_put",
    "tensordot",
    "scatter_add",
    "grid_sampler",
)  # fmt: skip  (grid_sampler: float32 on the CPU, promoted on CUDA)
# Registered at AutocastCPU only: on CUDA these fall through to their parts, each under CUDA's policy.
FALLTHROUGH = (
    "_addmm_activation",
    "_native_multi_head_attention",
    "adaptive_avg_pool3d",
    "adaptive_max_pool3d",
    "avg_pool3d",
    "cat",
    "stack",
    "index_copy",
    "conv1d.padding",
    "conv2d.padding",
    "conv3d.padding",
    "cross_entropy_loss",
    "ctc_loss.IntList",
    "ctc_loss.Tensor",
    "fractional_max_pool2d",
    "fractional_max_pool3d",
    "grid_sampler_2d",
    "grid_sampler_3d",
    "_grid_sampler_2d_cpu_fallback",
    "max_pool3d",
    "max_unpool2d",
    "max_unpool3d",
    "mkldnn_rnn_layer",
    "multilabel_margin_loss_forward",
    "polar",
    "reflection_pad1d",
    "reflection_pad2d",
    "replication_pad1d",
    "replication_pad2d",
    "replication_pad3d",
    "stft",
    "stft.center",
    "trace",
    "view_as_complex",
    "quantile",
    "quantile.scalar",
    "nanquantile",
    "nanquantile.scalar",
)  # fmt: skip  (and linear algebra, FFTs, fake quantisation: not a training step's memory, left as they are)


def _op(name: str) -> Any:
    base, _, overload = name.partition(".")
    return getattr(getattr(_aten, base), overload or "default")


def _exists(name: str) -> bool:
    try:
        _op(name)
    except (AttributeError, RuntimeError):
        return False
    return True


def sdpa_backend(sm: int, q: torch.Tensor, v: torch.Tensor, attn_mask: Any) -> str:
    """The kernel CUDA's ``select_sdp_backend`` picks on a card of compute capability ``sm`` (its main
    checks, ``sdp_utils.cpp``): ``"flash"`` (sm80+, fp16/bf16, no mask, head dim ≤ 256 and a multiple of 8),
    else ``"efficient"`` (sm50+, bf16 only from sm80, head dims a multiple of 8 in half precision, of 4 in
    float32), else ``"math"``."""
    half = q.dtype in _HALF
    head, head_v = q.shape[-1], v.shape[-1]
    if sm >= 80 and half and attn_mask is None and head == head_v and head <= 256 and head % 8 == 0:
        return "flash"
    align = 8 if half else 4
    if sm >= 50 and (q.dtype != torch.bfloat16 or sm >= 80) and head % align == 0 and head_v % align == 0:
        return "efficient"
    return "math"


class KernelPolicy:
    """CUDA's kernels for a card of compute capability ``sm``, while :func:`cuda_kernels` is entered.

    Attributes:
        sm: the compute capability (major × 10 + minor).
        fused_attention: route attention to the fused kernels (``False`` on real CPU tensors, where they
            have no kernel).
        backends: how many attention calls took each kernel.
    """

    def __init__(self, sm: int, fused_attention: bool = True) -> None:
        self.sm, self.fused_attention = sm, fused_attention
        self.backends: Counter[str] = Counter()
        self._casts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # autocast's cache of cast weights

    @contextlib.contextmanager
    def region(self, autocast: contextlib.AbstractContextManager[Any]) -> Iterator[None]:
        """The step's autocast region: the weights' casts are cached inside it, as autocast's are."""
        try:
            with autocast:
                yield
        finally:
            self._casts.clear()

    def describe(self) -> str:
        """``'CUDA's autocast lists; attention: flash × 24'``."""
        used = ", ".join(f"{name} × {n}" for name, n in sorted(self.backends.items())) or "not called"
        return f"CUDA's autocast op lists, fused dropout; attention: {used}"

    # -- casts, as autocast_mode.h's cached_cast makes them -------------------------------------------------
    def _lower(self, t: Any) -> Any:
        dtype = torch.get_autocast_dtype("cpu")
        floating = isinstance(t, torch.Tensor) and t.is_floating_point()
        if not floating or t.dtype in (dtype, torch.float64):
            return t
        if t.dtype == torch.float32 and t.requires_grad and t.is_leaf and not t._is_view():  # a weight
            hit = self._casts.get(id(t))
            if hit is None or hit[0] is not t:
                hit = self._casts[id(t)] = (t, t.to(dtype))
            return hit[1]
        return t.to(dtype)

    @staticmethod
    def _fp32(t: Any) -> Any:
        return t.to(torch.float32) if isinstance(t, torch.Tensor) and t.dtype in _HALF else t

    @staticmethod
    def _each(value: Any, cast: Callable[[Any], Any]) -> Any:
        return type(value)(cast(v) for v in value) if isinstance(value, (list, tuple)) else cast(value)

    def _kernel(self, op: Any, cast: Callable[[Any], Any]) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> Any:
            with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
                return op(*(self._each(a, cast) for a in args), **kwargs)

        return kernel

    def _promote(self, op: Any) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> Any:
            flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
            wide = any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in flat)
            return self._kernel(op, self._fp32 if wide else self._lower)(*args, **kwargs)

        return kernel

    @staticmethod
    def _set_dtype(op: Any) -> Callable[..., Any]:
        position = next(i for i, a in enumerate(op._schema.arguments) if a.name == "dtype")

        def kernel(*args: Any, **kwargs: Any) -> Any:
            with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
                x = args[0]
                given = args[position] if len(args) > position else kwargs.get("dtype")
                eligible = isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
                if given is None and eligible:
                    if len(args) > position:
                        args = (*args[:position], torch.float32, *args[position + 1 :])
                    else:
                        kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)

        return kernel

    @staticmethod
    def _append_dtype(target: Any) -> Callable[..., Any]:
        def kernel(x: torch.Tensor, p: Any = 2, dim: Any = None, keepdim: bool = False) -> Any:
            with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
                eligible = x.is_floating_point() and x.dtype != torch.float64
                dtype = torch.float32 if eligible else x.dtype
                return target(x, p, dtype=dtype) if dim is None else target(x, p, dim, keepdim, dtype=dtype)

        return kernel

    # -- attention and dropout -----------------------------------------------------------------------------
    def _sdpa_autocast(self, q: Any, k: Any, v: Any, attn_mask: Any = None, *rest: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):  # CUDA's lower policy casts every float input
            q, k, v, attn_mask = (self._lower(t) for t in (q, k, v, attn_mask))
            return _aten.scaled_dot_product_attention.default(q, k, v, attn_mask, *rest, **kwargs)

    def _sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        backend = sdpa_backend(self.sm, q, v, attn_mask) if self.fused_attention else "math"
        self.backends[backend] += 1
        if backend == "math":
            return _aten._scaled_dot_product_attention_math.default(
                q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
            )[0]
        if enable_gqa and k.shape[-3] != q.shape[-3]:  # the fused kernels are given every head (pessimistic)
            repeat = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
        if backend == "flash":
            return _aten._scaled_dot_product_flash_attention.default(
                q, k, v, dropout_p, is_causal, False, scale=scale
            )[0]
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:  # sdpa's convert_boolean_attn_mask
            bias = torch.where(bias.logical_not(), float("-inf"), 0.0).to(q.dtype)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return _aten._scaled_dot_product_efficient_attention.default(
            q, k, v, bias, grad, dropout_p, is_causal, scale=scale
        )[0]

    @staticmethod
    def _dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        # Dropout.cpp's dropout(): CUDA's fused kernel (a bool mask kept for backward) where
        # is_fused_kernel_acceptable, else _dropout_impl, as on the CPU.
        if not train or p == 0 or x.numel() == 0:
            return x
        if p == 1:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        return _aten.native_dropout.default(x, p, train)[0]

    def register(self, lib: torch.library.Library) -> None:
        """Register this policy's kernels in ``lib`` (an ``aten`` IMPL library)."""
        for name in LOWER:
            lib.impl(name, self._kernel(_op(name), self._lower), "AutocastCPU")
        for name in FP32:
            lib.impl(name, self._kernel(_op(name), self._fp32), "AutocastCPU")
        for name in FP32_SET_OPT_DTYPE:
            lib.impl(name, self._set_dtype(_op(name)), "AutocastCPU")
        for name, target in FP32_APPEND_DTYPE.items():
            lib.impl(name, self._append_dtype(_op(target)), "AutocastCPU")
        for name in PROMOTE:
            lib.impl(name, self._promote(_op(name)), "AutocastCPU")
        for name in FALLTHROUGH:
            if _exists(name):
                lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        lib.impl("scaled_dot_product_attention", self._sdpa_autocast, "AutocastCPU")
        lib.impl("scaled_dot_product_attention", self._sdpa, "CompositeImplicitAutograd")
        lib.impl("dropout", self._dropout, "CompositeImplicitAutograd")


@contextlib.contextmanager
def cuda_kernels(sm: int, *, fused_attention: bool = True) -> Iterator[KernelPolicy]:
    """Inside the block, the CPU runs CUDA's kernels for a card of compute capability ``sm`` (see the
    module's docs); its autocast region is :meth:`KernelPolicy.region`.

    Example:
        >>> x = torch.randn(4, 8)
        >>> with cuda_kernels(80) as policy, policy.region(torch.autocast("cpu", dtype=torch.float16)):
        ...     torch.nn.functional.layer_norm(x.half(), (8,)).dtype
        torch.float32
    """
    policy = KernelPolicy(sm, fused_attention)
    with _LOCK:
        lib = torch.library.Library("aten", "IMPL")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
                policy.register(lib)
            yield policy
        finally:
            lib._destroy()
