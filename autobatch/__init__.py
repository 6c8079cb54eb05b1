"""autobatch: find the largest micro-batch that fits, accumulate to the target batch, never OOM.

The public names load on first use (PEP 562): ``import autobatch`` costs nothing, and the command line's
``--help``, ``--version`` and ``cache`` start without importing torch. ``from autobatch import fit`` and
``autobatch.fit`` work as usual.

Example:
    >>> import autobatch
    >>> autobatch.plan(12, 32).chunks
    (11, 11, 10)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autobatch._version import __version__
from autobatch.errors import (
    AutobatchError,
    EvaluationError,
    NoBatchFitsError,
    NonFiniteLossError,
    OptimizerStepError,
    PeerError,
    PredictionError,
    UsageError,
    UsageTypeError,
    UsageValueError,
)
from autobatch.units import format_bytes, parse_memory_limit

if TYPE_CHECKING:
    from autobatch.api import fit, probe, try_batch
    from autobatch.memory.device import memory_limit_scope
    from autobatch.memory.oom import is_oom, release_memory
    from autobatch.planner import Plan, plan, uniform_plan
    from autobatch.probing.prediction import predict
    from autobatch.probing.search import Trial
    from autobatch.result import Backoff, EvalReport, FitResult, ProbeResult
    from autobatch.training.trainstep import StepReport, TrainStep

_LAZY = {
    "fit": "autobatch.api",
    "probe": "autobatch.api",
    "try_batch": "autobatch.api",
    "memory_limit_scope": "autobatch.memory.device",
    "is_oom": "autobatch.memory.oom",
    "release_memory": "autobatch.memory.oom",
    "Plan": "autobatch.planner",
    "plan": "autobatch.planner",
    "uniform_plan": "autobatch.planner",
    "predict": "autobatch.probing.prediction",
    "Backoff": "autobatch.result",
    "EvalReport": "autobatch.result",
    "FitResult": "autobatch.result",
    "ProbeResult": "autobatch.result",
    "Trial": "autobatch.probing.search",
    "StepReport": "autobatch.training.trainstep",
    "TrainStep": "autobatch.training.trainstep",
}

__all__ = [
    "AutobatchError",
    "Backoff",
    "EvalReport",
    "EvaluationError",
    "FitResult",
    "NoBatchFitsError",
    "NonFiniteLossError",
    "OptimizerStepError",
    "PeerError",
    "Plan",
    "PredictionError",
    "ProbeResult",
    "StepReport",
    "TrainStep",
    "Trial",
    "UsageError",
    "UsageTypeError",
    "UsageValueError",
    "__version__",
    "fit",
    "format_bytes",
    "is_oom",
    "memory_limit_scope",
    "parse_memory_limit",
    "plan",
    "predict",
    "probe",
    "release_memory",
    "try_batch",
    "uniform_plan",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autobatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
