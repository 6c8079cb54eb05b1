"""The training progress bar: one tqdm bar per epoch, showing the micro-batches that run.

``batch=16×4=64`` is the plan in force (after a back-off, the smaller one), written as its chunks: the probed
maximum may be larger than any chunk (a target of 64 at micro-batch 19 runs 16×4). The bar hides itself off a
terminal (``progress=None``), and draws in a terminal that reports a size of 0, where tqdm by itself prints
only blank lines.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from tqdm.auto import tqdm

from autobatch.planner import Plan

__all__ = ["batch_label", "epoch_bar"]


def epoch_bar(total: int, desc: str, progress: bool | None) -> Any:
    """A tqdm bar of ``total`` steps on stderr: shown with ``progress=True``, on a terminal with ``None``."""
    return tqdm(
        total=total,
        desc=desc,
        unit="step",
        disable=None if progress is None else not progress,
        leave=True,
        file=sys.stderr,
        **_bar_shape(sys.stderr),
    )


def batch_label(current: Plan) -> str:
    """The plan as the progress bar shows it: the micro-batches a step runs, and the batch they make.

    Example:
        >>> from autobatch.planner import plan
        >>> batch_label(plan(19, 64)), batch_label(plan(12, 32)), batch_label(plan(5, 39))
        ('16×4=64', '11+11+10=32', '5×7+4=39')
        >>> batch_label(plan(8, 32, world_size=2))
        '(8×2)×2 ranks=32'
    """
    sizes = current.chunks.sizes()
    if len(sizes) == 1:
        split = f"{sizes[0][0]}×{sizes[0][1]}"
    elif current.accumulation_steps <= 4:
        split = "+".join(str(size) for size in current.chunks)
    else:
        split = "+".join(f"{size}×{n}" if n > 1 else str(size) for size, n in sizes)
    if current.world_size > 1:
        split = f"({split})×{current.world_size} ranks"
    return f"{split}={current.effective_batch}"


def _bar_shape(stream: Any) -> dict[str, int]:
    """tqdm's ``ncols`` and ``nrows`` where the terminal reports a size of 0 (a pty nobody sized, as some CI
    runners and containers give): tqdm would draw nothing there and print blank lines. ``{}`` elsewhere:
    tqdm asks the terminal itself."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return {}
    if size.columns > 0 and size.lines > 0:
        return {}
    fallback = shutil.get_terminal_size()  # $COLUMNS and $LINES, else 80×24 where the terminal says 0
    # tqdm leaves the last column and row free, as it does with the sizes it reads itself.
    return {"ncols": (size.columns or fallback.columns) - 1, "nrows": (size.lines or fallback.lines) - 1}
