"""The process-wide torch settings that steer which kernels a step runs, and so its memory.

``torch.backends.cuda.enable_flash_sdp(False)`` makes attention materialise its score matrix;
``torch.backends.cudnn.benchmark`` lets cuDNN pick convolution algorithms with larger workspaces;
deterministic algorithms, TF32 and reduced-precision reductions choose other kernels; the default dtype
sizes every tensor a model creates; a module hook registered for every module
(``torch.nn.modules.module.register_module_forward_hook``) runs in every forward. :func:`torch_settings`
reads them all, each one that this torch has, as the probe cache's key holds them.

Example:
    >>> settings = torch_settings()
    >>> settings["default_dtype"], settings["cudnn.benchmark"]
    ('torch.float32', False)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules import module as _module

from autobatch.cache.codehash import value_digest

__all__ = ["torch_settings"]

_b = torch.backends


def _either(legacy: Callable[[], Any], *new: str) -> Callable[[], Any]:
    """Read a setting the legacy way; where torch refuses to (the newer ``fp32_precision`` settings are in
    use and say more than the legacy flag can), read those instead. Never both: a legacy setter also
    writes the newer settings ("none" becomes "ieee"), and the key must not change when nothing did."""

    def read() -> Any:
        try:
            return legacy()
        except RuntimeError:
            return ["fp32_precision", *(str(functools.reduce(getattr, path.split("."), _b)) for path in new)]

    return read


_FP32 = ("fp32_precision", "cuda.matmul.fp32_precision")
_FP32_CUDNN = (
    "fp32_precision",
    "cudnn.fp32_precision",
    "cudnn.conv.fp32_precision",
    "cudnn.rnn.fp32_precision",
)

_FLAGS: dict[str, Callable[[], Any]] = {
    "default_dtype": torch.get_default_dtype,
    "deterministic": torch.are_deterministic_algorithms_enabled,
    "deterministic.warn_only": torch.is_deterministic_algorithms_warn_only_enabled,
    "float32_matmul_precision": _either(torch.get_float32_matmul_precision, *_FP32),
    "anomaly": torch.is_anomaly_enabled,
    "cuda.matmul.allow_tf32": _either(lambda: _b.cuda.matmul.allow_tf32, *_FP32),
    "cuda.matmul.allow_fp16_reduction": lambda: _b.cuda.matmul.allow_fp16_reduced_precision_reduction,
    "cuda.matmul.allow_bf16_reduction": lambda: _b.cuda.matmul.allow_bf16_reduced_precision_reduction,
    "cuda.flash_sdp": lambda: _b.cuda.flash_sdp_enabled(),
    "cuda.mem_efficient_sdp": lambda: _b.cuda.mem_efficient_sdp_enabled(),
    "cuda.math_sdp": lambda: _b.cuda.math_sdp_enabled(),
    "cuda.cudnn_sdp": lambda: _b.cuda.cudnn_sdp_enabled(),
    "cuda.math_sdp.fp16_bf16_reduction": lambda: _b.cuda.fp16_bf16_reduction_math_sdp_allowed(),
    "cuda.preferred_linalg_library": lambda: _b.cuda.preferred_linalg_library(),
    "cuda.preferred_blas_library": lambda: _b.cuda.preferred_blas_library(),
    "cudnn.enabled": lambda: _b.cudnn.enabled,
    "cudnn.benchmark": lambda: _b.cudnn.benchmark,
    "cudnn.deterministic": lambda: _b.cudnn.deterministic,
    "cudnn.allow_tf32": _either(lambda: _b.cudnn.allow_tf32, *_FP32_CUDNN),
    "mkldnn.enabled": lambda: _b.mkldnn.enabled,
    "opt_einsum": lambda: (_b.opt_einsum.enabled, _b.opt_einsum.strategy),
}
"""Each setting and how to read it; one this torch lacks is left out (the key holds torch's version)."""


def _readable(value: Any) -> Any:
    """A setting as JSON: plain values as they are, a dtype or an enum member by its name."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, tuple):
        return [_readable(v) for v in value]
    return str(value)


def _module_hooks() -> str:
    """The digest of the hooks registered for every module, in order (never their handle ids, which
    count up through a process)."""

    def held(name: str) -> dict[Any, Any]:
        found = getattr(_module, name, None)
        return found if isinstance(found, dict) else {}

    forward = list(held("_global_forward_hooks"))
    return value_digest(
        {
            "forward_pre": list(held("_global_forward_pre_hooks").values()),
            "forward": list(held("_global_forward_hooks").values()),
            "with_kwargs": [
                forward.index(h) for h in held("_global_forward_hooks_with_kwargs") if h in forward
            ],
            "always_called": [
                forward.index(h) for h in held("_global_forward_hooks_always_called") if h in forward
            ],
            "backward_pre": list(held("_global_backward_pre_hooks").values()),
            "backward": list(held("_global_backward_hooks").values()),
            "full_backward": getattr(_module, "_global_is_full_backward_hook", None),
        }
    )


def torch_settings() -> dict[str, Any]:
    """The settings as a JSON-safe dict (``"module_hooks"``: the digest of the hooks of every module)."""
    found: dict[str, Any] = {}
    for name, read in _FLAGS.items():
        try:
            found[name] = _readable(read())
        except (AttributeError, RuntimeError, TypeError, ValueError):  # not in this torch, or this build
            continue
    found["module_hooks"] = _module_hooks()
    return found
