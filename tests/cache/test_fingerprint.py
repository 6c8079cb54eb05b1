"""The probe cache's key sees what changes a step's memory (issue 18, defect 1), and only that.

Each case builds a setup twice the same way (the key must not change: across two runs in one process, and
for one setup across two processes) and once with one thing changed that changes the step's memory (the
key must change). The key is taken as the probe takes it, through ``ProbeStore.open``; no trial runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autobatch.cache.probestore import ProbeStore
from autobatch.cache.store import ENV_VAR
from autobatch.options import Options
from autobatch.probing.prober import Prober
from autobatch.session import resolve


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)


def probe_key(model: nn.Module, data: Any = None, **options: Any) -> str:
    """The key a probe of this setup looks up (computed as the probe does; no trial runs)."""
    options = {"memory_limit": "96KiB", "precision": "fp32", "device": "cpu", **options}
    session = resolve(model, _data() if data is None else data, Options.parse("probe", options))
    with session.start():
        prober = Prober(session)
        with prober.restoring():
            store = ProbeStore.open(prober, len(session.source))
    assert store is not None
    return store.key


# -- the setups: variant 0 is the baseline, variant 1 changes one thing that changes a step's memory ---------

MODULE_SOURCE = """
import torch
from torch import nn

COPIES = 1

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.cat([x] * COPIES))[: x.shape[0]]
"""


def _user_module() -> types.ModuleType:
    module = types.ModuleType("user_model")
    exec(compile(MODULE_SOURCE, "<user_model>", "exec"), module.__dict__)
    return module


_GLOBAL = _user_module()


def global_constant(variant: int) -> dict[str, Any]:
    _GLOBAL.COPIES = 1 + 3 * variant  # edited between two runs, as in a notebook
    return {"model": _GLOBAL.Net()}


class Scaled(nn.Module):
    """A module steered by an attribute that is not a plain public value."""

    def __init__(self, **attributes: Any) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)
        for name, value in attributes.items():
            setattr(self, name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@dataclasses.dataclass
class Config:
    copies: int
    widths: list[int]


def _relu_hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return torch.relu(output)


def _widening_hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output + 0 * torch.cat([output] * 4).sum()


def _pre_hook(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    return (args[0] * 2,)


def _backward_hook(module: nn.Module, grad_in: Any, grad_out: Any) -> None:
    return None


def hooked(register: Callable[[nn.Module], Any] | None) -> Callable[[int], dict[str, Any]]:
    def make(variant: int) -> dict[str, Any]:
        model = Scaled()
        if variant and register is not None:
            register(model.fc)
        return {"model": model}

    return make


def other_hook(variant: int) -> dict[str, Any]:
    model = Scaled()
    model.fc.register_forward_hook(_widening_hook if variant else _relu_hook)
    return {"model": model}


class Trainer:
    """A step function as a bound method: the instance's state steers it."""

    def __init__(self, copies: int, widths: list[int]) -> None:
        self.copies, self.widths = copies, widths

    def step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(torch.cat([x] * self.copies))[: len(y)], y)


class Holder:
    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes


def closure_over(holder: Holder) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y) + 0 * out.repeat(1, len(holder.sizes)).sum()

    return loss


class Augment:
    """A torchvision-style transform object, applied with probability ``p``. A sample keeps its shape: the
    largest sample (all the key used to see of the data) does not show it."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x) if float(torch.rand(())) < self.p else x


class Images(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset that holds its samples and a ``transform=``, as torchvision's do."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None, n: int = 200) -> None:
        self.x, self.y = _data(n)
        self.rows = [row for row in self.x]  # the data itself: never hashed
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.rows[i]
        return (self.transform(x) if self.transform is not None else x), self.y[i]


Samples = list[tuple[torch.Tensor, torch.Tensor]]


def padded(samples: Samples, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([s for s, _ in samples])
    return F.pad(x, (0, width - x.shape[1])), torch.stack([t for _, t in samples])


def pairs(samples: Samples, negatives: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A contrastive collate: the differences of every pair of samples, ``negatives`` times. A batch of one
    has no pairs: the change shows only above batch 1."""
    x = torch.stack([s for s, _ in samples])
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return (x, (x[i] - x[j]).repeat(negatives, 1)), torch.stack([t for _, t in samples])


SETUPS: dict[str, Callable[[int], dict[str, Any]]] = {
    "a global constant forward reads": global_constant,
    "a private attribute": lambda v: {"model": Scaled(_copies=1 + 3 * v)},
    "a dict attribute": lambda v: {"model": Scaled(cfg={"copies": 1 + 3 * v})},
    "an object attribute": lambda v: {"model": Scaled(cfg=Config(1, [8] * (1 + v)))},
    "a function attribute": lambda v: {"model": Scaled(act=F.gelu if v else F.relu)},
    "a lambda attribute": lambda v: {"model": Scaled(act=(lambda x: x * 2) if v else (lambda x: x))},
    "a forward hook": hooked(lambda m: m.register_forward_hook(_relu_hook)),
    "another forward hook": other_hook,
    "a forward hook with kwargs": hooked(lambda m: m.register_forward_hook(_relu_hook, with_kwargs=True)),
    "a forward pre-hook": hooked(lambda m: m.register_forward_pre_hook(_pre_hook)),
    "a full backward hook": hooked(lambda m: m.register_full_backward_hook(_backward_hook)),
    "a bound-method step_fn": lambda v: {"model": Scaled(), "step_fn": Trainer(1 + 3 * v, [8]).step},
    "a bound-method step_fn's list": lambda v: {"model": Scaled(), "step_fn": Trainer(1, [8] * (1 + v)).step},
    "an object in a closure holding a list": lambda v: {
        "model": Scaled(),
        "loss_fn": closure_over(Holder([8] * (1 + 3 * v))),
    },
    "a dataset transform object": lambda v: {"model": Scaled(), "data": Images(Augment(0.5 * v))},
    "a dataset transform function": lambda v: {
        "model": Scaled(),
        "data": Images((lambda x: x.sin()) if v else (lambda x: x)),
    },
    "a collate_fn that shows only above batch 1": lambda v: {
        "model": Scaled(),
        "data": DataLoader(Images(), collate_fn=functools.partial(pairs, negatives=1 + 3 * v)),
    },
}


@pytest.mark.parametrize("make", SETUPS.values(), ids=SETUPS.keys())
def test_a_change_that_changes_a_step_s_memory_changes_the_key(make: Callable[[int], dict[str, Any]]) -> None:
    before = probe_key(**make(0))
    assert probe_key(**make(0)) == before  # the same setup, built again: the same key
    assert probe_key(**make(1)) != before
    assert probe_key(**make(0)) == before  # and back


@contextlib.contextmanager
def _attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def _sdp(kind: str) -> Iterator[None]:
    cuda = torch.backends.cuda
    enabled, enable = getattr(cuda, f"{kind}_sdp_enabled"), getattr(cuda, f"enable_{kind}_sdp")
    old = enabled()
    enable(not old)
    try:
        yield
    finally:
        enable(old)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(not old)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


@contextlib.contextmanager
def _matmul_precision(value: str) -> Iterator[None]:
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _module_hook() -> Iterator[None]:
    handle = nn.modules.module.register_module_forward_hook(_relu_hook)
    try:
        yield
    finally:
        handle.remove()


SETTINGS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "flash attention": lambda: _sdp("flash"),
    "memory-efficient attention": lambda: _sdp("mem_efficient"),
    "math attention": lambda: _sdp("math"),
    "cuDNN attention": lambda: _sdp("cudnn"),
    "cudnn.benchmark": lambda: _attribute(torch.backends.cudnn, "benchmark", True),
    "cudnn.deterministic": lambda: _attribute(torch.backends.cudnn, "deterministic", True),
    "cudnn.enabled": lambda: _attribute(torch.backends.cudnn, "enabled", False),
    "cuda.matmul.allow_tf32": lambda: _attribute(torch.backends.cuda.matmul, "allow_tf32", True),
    "deterministic algorithms": _deterministic,
    "float32 matmul precision": lambda: _matmul_precision("medium"),
    "default dtype": lambda: _default_dtype(torch.float64),
    "a forward hook on every module": _module_hook,
}
if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch 2.9's settings for TF32
    SETTINGS["cuda.matmul.fp32_precision"] = lambda: _attribute(
        torch.backends.cuda.matmul, "fp32_precision", "tf32"
    )
    SETTINGS["cudnn.conv.fp32_precision"] = lambda: _attribute(
        torch.backends.cudnn.conv, "fp32_precision", "ieee"
    )


@pytest.mark.parametrize("change", SETTINGS.values(), ids=SETTINGS.keys())
def test_a_torch_setting_that_picks_other_kernels_changes_the_key(
    change: Callable[[], contextlib.AbstractContextManager[None]],
) -> None:
    model, data = Scaled(), _data()
    before = probe_key(model, data)
    assert probe_key(model, data) == before
    with change():
        changed = probe_key(model, data)
    assert changed != before
    assert probe_key(model, data) == before  # the setting restored: the key too


# -- what must not change the key -----------------------------------------------------------------------


def test_the_dataset_s_samples_are_never_walked() -> None:
    """A dataset's data (a list of 200 rows) counts by its length: other values, the same key."""
    first, second = Images(), Images()
    second.rows = [row * 2 for row in second.rows]
    assert probe_key(Scaled(), first) == probe_key(Scaled(), second)


def test_hook_handle_ids_never_reach_the_key() -> None:
    """Handles count up through a process: the same hooks registered later keep the key."""
    first = Scaled()
    first.fc.register_forward_hook(_relu_hook, always_call=True)
    for _ in range(5):  # other hooks come and go in between
        Scaled().fc.register_forward_pre_hook(_pre_hook).remove()
    second = Scaled()
    second.fc.register_forward_hook(_relu_hook, always_call=True)
    assert probe_key(first) == probe_key(second)


def representative(extra_hooks: int) -> dict[str, Any]:
    """A setup with one of each kind of thing the key reads: run in other processes by the test below."""
    for _ in range(extra_hooks):  # shift the handle ids
        nn.Linear(1, 1).register_forward_hook(_relu_hook).remove()
    _GLOBAL.COPIES = 2
    model = _GLOBAL.Net()
    model.fc.register_forward_hook(_relu_hook)
    model.fc.register_forward_pre_hook(_pre_hook)
    model.names = {"alpha", "beta", "gamma", "delta"}  # a set of str: its order follows the hash seed
    model.cfg = Config(2, [8, 16])
    trainer = Trainer(2, [8])
    data = DataLoader(Images(Augment(0.5)), collate_fn=functools.partial(padded, width=8))
    return {"model": model, "data": data, "step_fn": trainer.step}


KEY_IN_A_PROCESS = """
import sys
from tests.cache.test_fingerprint import probe_key, representative
print(probe_key(**representative(int(sys.argv[1]))))
"""


@pytest.mark.slow
def test_an_unchanged_setup_keeps_its_key_across_processes(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])

    def key(extra_hooks: int, seed: str) -> str:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            "PYTHONHASHSEED": seed,
            ENV_VAR: str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1",
        }
        done = subprocess.run(
            [sys.executable, "-c", KEY_IN_A_PROCESS, str(extra_hooks)],
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    first = key(0, "1")
    assert len(first) == 64
    assert key(7, "2") == first  # other hook handle ids, another hash seed: the same key
    assert probe_key(**representative(3)) == first  # and in this process


def _many(n: int, last: int) -> nn.Module:
    """``n`` modules, each with a list attribute: more values than one part's budget (100,000)."""
    blocks = nn.ModuleList(nn.Identity() for _ in range(n))
    for block in blocks:
        block.sizes = [1] * 8
    blocks[-1].sizes = [last] * 8
    return nn.Sequential(blocks, nn.Linear(8, 2))


def test_a_large_model_leaves_the_other_parts_their_budget() -> None:
    def keyed(last: int, k: float) -> str:
        model = _many(12_000, last)
        return probe_key(model, loss_fn=lambda out, y: F.cross_entropy(out, y) * k)

    before = keyed(1, 1.0)
    assert keyed(2, 1.0) != before  # the last module's attribute: the model's budget grows with it
    assert keyed(1, 2.0) != before  # the loss function still has a budget of its own
