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
