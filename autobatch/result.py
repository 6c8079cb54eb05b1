"""What the probe returns: data first, rendered as a rich table only at the edge."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from autobatch.memory import format_bytes
from autobatch.search import Trial

__all__ = ["ProbeResult", "Trial"]


def _bytes(n: float | None) -> str:
    return "–" if n is None else format_bytes(n)


@dataclass
class ProbeResult:
    """The outcome of :func:`autobatch.probe`.

    Attributes:
        micro_batch: the batch size to train with (``max_fitting_batch`` after margin and rounding).
        max_fitting_batch: the exact largest batch whose step fitted.
        first_failure: the smallest batch that ran out of memory (``None`` when capped first).
        capped_by: ``"max_batch"`` or ``"dataset"`` when the search stopped at a cap, else ``None``.
        device: the device probed.
        precision: the resolved precision (``"fp16"``, ``"bf16"`` or ``"fp32"``).
        memory_limit: the limit in bytes the steps ran under (``None``: the whole device).
        limit_kind: the limit and how it was enforced, for people.
        trials: every measured step (batch, fitted, peak bytes, seconds), in order.
        fixed_bytes: the fitted memory model's constant term (model state and workspace).
        bytes_per_sample: the fitted memory model's slope.
        model_state_bytes: parameters, buffers, gradients and optimizer state held between steps.
        steps: training steps run, the warm-up included.
        ooms: trials that ran out of memory.
        margin: the fraction left free.
        multiple_of: the rounding applied.
        seconds: wall time of the probe.
    """

    micro_batch: int
    max_fitting_batch: int
    first_failure: int | None
    capped_by: str | None
    device: str
    precision: str
    memory_limit: int | None
    limit_kind: str
    trials: list[Trial] = field(default_factory=list)
    fixed_bytes: float | None = None
    bytes_per_sample: float | None = None
    model_state_bytes: int | None = None
    steps: int = 0
    ooms: int = 0
    margin: float = 0.0
    multiple_of: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (trials as dicts)."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs: ``micro-batch 48 (largest fitting 48, 49 OOM) in 6 steps, 1 OOM``."""
        if self.capped_by is not None:
            why = f"capped by {self.capped_by}"
        else:
            why = f"{self.first_failure} does not fit"
        return (
            f"micro-batch {self.micro_batch} (largest fitting {self.max_fitting_batch}, {why}) on "
            f"{self.device} in {self.precision}, {self.steps} steps, {self.ooms} OOM"
            + ("s" if self.ooms != 1 else "")
        )

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title=f"autobatch probe — {self.summary()}", title_justify="left")
        table.add_column("batch", justify="right")
        table.add_column("fits")
        table.add_column("peak", justify="right")
        table.add_column("seconds", justify="right")
        for trial in self.trials:
            table.add_row(
                str(trial.batch),
                "[green]yes[/]" if trial.fitted else "[red]OOM[/]",
                _bytes(trial.peak_bytes),
                f"{trial.seconds:.3f}",
            )
        caption = [f"limit {self.limit_kind}", f"model state {_bytes(self.model_state_bytes)}"]
        if self.bytes_per_sample is not None:
            caption.append(f"memory ≈ {_bytes(self.fixed_bytes)} + {_bytes(self.bytes_per_sample)} × batch")
        if self.margin or self.multiple_of > 1:
            caption.append(f"margin {self.margin:.0%}, multiple of {self.multiple_of}")
        table.caption = " · ".join(caption)
        return table
