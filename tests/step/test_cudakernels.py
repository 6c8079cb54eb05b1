"""CUDA's kernels on the CPU (:mod:`autobatch.step.cudakernels`): the op lists follow the dispatcher's
registrations, each policy does what CUDA's does, attention takes the card's kernel, and leaving the block
puts the CPU's back. On fake tensors: nothing is computed."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from autobatch.memory.emulate import EmulatedDevice
from autobatch.step import cudakernels
from autobatch.step.cudakernels import cuda_kernels

HALF = torch.autocast("cpu", dtype=torch.float16)


def _registered(key: str) -> set[str]:
    names = torch._C._dispatch_get_all_op_names()
    return {n.removeprefix("aten::") for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, key)}


def test_the_op_lists_follow_the_dispatchers_registrations() -> None:
    cuda, cpu = _registered("AutocastCUDA"), _registered("AutocastCPU")
    ours = {
        *cudakernels.LOWER,
        *cudakernels.FP32,
        *cudakernels.FP32_SET_OPT_DTYPE,
        *cudakernels.FP32_APPEND_DTYPE,
        *cudakernels.PROMOTE,
    }
    # What only CUDA casts is ours to cast (cuDNN's own convolutions never run on the CPU).
    missing = cuda - cpu - ours - {"cudnn_convolution", "cudnn_convolution_transpose"}
    assert not missing, f"CUDA autocasts these and the policy does not: {sorted(missing)}"
    # What only the CPU casts falls through, as on CUDA (linear algebra and FFTs aside: not a step's memory).
    aside = re.compile(
        r"^(linalg_|fft_|_?lu|cholesky|inverse|pinverse|orgqr|ormqr|geqrf|qr|svd|triang|fake_q)"
    )
    left = {n for n in cpu - cuda - set(cudakernels.FALLTHROUGH) if not aside.match(n)}
    assert not left, f"the CPU autocasts these and CUDA does not: {sorted(left)}"
    for name in ours - {"prod", "prod.dim_int", "grid_sampler"}:  # the three in both, with other policies
        assert name in cuda, name


def test_layer_norm_softmax_and_the_loss_run_in_float32_as_on_cuda() -> None:
    x = torch.randn(4, 8).half()
    with HALF:
        assert F.layer_norm(x, (8,)).dtype == torch.float16  # the CPU's policy
    with cuda_kernels(80) as policy, policy.region(HALF):
        assert F.layer_norm(x, (8,)).dtype == torch.float32
        assert F.softmax(x, -1).dtype == torch.float32  # dtype=float32, no cast of the input
        assert torch.cumsum(x, 0).dtype == torch.float32 and torch.norm(x).dtype == torch.float32
        assert torch.exp(x).dtype == torch.float32
        assert torch.addcmul(x, x.float(), x).dtype == torch.float32  # promoted to the widest
        assert torch.cat([x, x]).dtype == torch.float16  # CPU autocast would cast; CUDA leaves it
        assert torch.mv(torch.randn(3, 8), torch.randn(8)).dtype == torch.float16
    with HALF:
        assert F.layer_norm(x, (8,)).dtype == torch.float16  # the CPU's policy is back


def test_weights_are_cast_once_per_forward_as_autocast_caches_them() -> None:
    weight = torch.randn(8, 3, requires_grad=True)
    with cuda_kernels(80) as policy:
        with policy.region(HALF):
            a = torch.mv(weight, torch.randn(3))
            b = torch.mv(weight, torch.randn(3))
            cast = policy._casts[id(weight)][1]
        assert a.dtype == b.dtype == torch.float16 and cast.dtype == torch.float16
        assert not policy._casts  # dropped with the region, as autocast's cache is


@pytest.mark.parametrize(
    ("sm", "dtype", "mask", "backend"),
    [
        (80, torch.float16, False, "flash"),
        (90, torch.bfloat16, False, "flash"),
        (80, torch.float16, True, "efficient"),
        (75, torch.float16, False, "efficient"),
        (75, torch.bfloat16, False, "math"),
        (80, None, False, "efficient"),  # float32, no autocast
    ],
)
def test_attention_takes_the_kernel_cuda_picks_on_the_card(
    sm: int, dtype: torch.dtype | None, mask: bool, backend: str
) -> None:
    mode = FakeTensorMode()
    with mode:
        attention = torch.nn.MultiheadAttention(64, 4, dropout=0.1, batch_first=True)
        x = torch.randn(2, 16, 64)
        padding = torch.zeros(2, 16, dtype=torch.bool) if mask else None
    region = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with cuda_kernels(sm) as policy, mode:
        with policy.region(region):
            out = attention(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        out.float().sum().backward()  # the fused kernels' backward runs on fake tensors too
    assert dict(policy.backends) == {backend: 1}


def _peak(fn: object) -> int:
    mode = FakeTensorMode()
    with mode:
        q = torch.randn(8, 4, 1024, 64, requires_grad=True)
    with mode, EmulatedDevice(None) as device:
        fn(q)  # type: ignore[operator]
    return device.peak_bytes


def test_a_fused_kernel_holds_no_scores_and_dropout_keeps_a_bool_mask() -> None:
    def attend(q: torch.Tensor) -> None:
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.1).sum().backward()

    scores = 8 * 4 * 1024 * 1024 * 4  # B·H·L² in float32: what the math path holds
    host = _peak(attend)
    with cuda_kernels(80, fused_attention=True):
        card = _peak(attend)
    assert host > 2 * scores > card

    def drop(q: torch.Tensor) -> None:
        F.dropout(q, 0.1, True).sum().backward()

    n = 8 * 4 * 1024 * 64
    with cuda_kernels(80):  # the output and a bool mask, where the CPU keeps a float32 noise tensor
        assert 5 * n <= _peak(drop) <= 5 * n + 4096
    assert _peak(drop) >= 8 * n  # outside: the CPU's noise tensor is back
