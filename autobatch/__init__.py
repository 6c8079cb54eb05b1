"""autobatch: find the largest micro-batch that fits, accumulate to the target batch, never OOM.

Example:
    >>> import autobatch
    >>> autobatch.plan(12, 32).chunks
    (11, 11, 10)
"""

from autobatch._version import __version__
from autobatch.errors import AutobatchError, NoBatchFitsError
from autobatch.evaluate import EvalReport
from autobatch.fit import fit
from autobatch.memory import parse_memory_limit
from autobatch.oom import is_oom, release_memory
from autobatch.plan import Plan, plan
from autobatch.probe import probe, try_batch
from autobatch.result import Backoff, FitResult, ProbeResult, Trial

__all__ = [
    "AutobatchError",
    "Backoff",
    "EvalReport",
    "FitResult",
    "NoBatchFitsError",
    "Plan",
    "ProbeResult",
    "Trial",
    "__version__",
    "fit",
    "is_oom",
    "parse_memory_limit",
    "plan",
    "probe",
    "release_memory",
    "try_batch",
]
