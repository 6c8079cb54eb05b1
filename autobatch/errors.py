"""The exceptions autobatch raises on purpose.

Bad arguments raise the built-in ``ValueError`` or ``TypeError``; the classes here are for conditions that
are not a programming error in the call itself.
"""

from __future__ import annotations

__all__ = ["AutobatchError", "NoBatchFitsError"]


class AutobatchError(RuntimeError):
    """Base class of every error autobatch raises on purpose."""


class NoBatchFitsError(AutobatchError):
    """Not even a micro-batch of one sample fits in the device memory available.

    Attributes:
        memory_limit: the limit in bytes the step ran under, or ``None`` when unknown.
        model_state_bytes: bytes held by parameters, buffers, gradients and optimizer state, when measured.
    """

    def __init__(
        self,
        message: str,
        *,
        memory_limit: int | None = None,
        model_state_bytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.memory_limit = memory_limit
        self.model_state_bytes = model_state_bytes

    @classmethod
    def at_batch_one(
        cls, *, limit: int | None, precision: str, model_state_bytes: int, batch: int = 1
    ) -> NoBatchFitsError:
        """The error of a probe whose step ran out of memory at its smallest batch, with what to try.

        ``batch`` is that smallest batch: 1, or 2 for models with BatchNorm, which cannot train on one.
        """
        from autobatch.emulate import format_bytes

        hints = ["a larger memory_limit", "a smaller model"]
        if precision == "fp32":
            hints.insert(0, "precision='bf16' (or 'fp16' on CUDA)")
        hints.append("an optimizer with less state (SGD instead of Adam)")
        where = format_bytes(limit) if limit is not None else "the device capacity"
        return cls(
            f"Not even a batch of {batch} sample{'s' if batch != 1 else ''} fits: the training step ran out "
            f"of memory under {where} "
            f"with {format_bytes(model_state_bytes)} of model state in {precision}. Try "
            + ", ".join(hints)
            + ".",
            memory_limit=limit,
            model_state_bytes=model_state_bytes,
        )
