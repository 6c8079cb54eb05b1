"""Tests for autobatch.memory.survival: a micro-batch fits when training at it survives consecutive steps,
from a cold start and from steady state, with the allocator's cache carried from step to step."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn

from autobatch import NoBatchFitsError, fit, probe, try_batch
from autobatch.memory.device import DeviceMemory
from autobatch.memory.survival import COLD, STEADY, SurvivalPredictor, fit_step_model, survive
from autobatch.memory.timeline import Timeline, largest_in_regions
from autobatch.planner import plan
from autobatch.step.stepper import Stepper
from autobatch.step.transaction import run_step
from tests.models import CNN

MiB = 1 << 20
CPU = torch.device("cpu")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


@functools.cache
def _data(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 512, generator=g), torch.randint(0, 10, (n,), generator=g)


# An MLP with AdamW under 48 MiB of the emulated caching allocator: its optimizer state, made by the first
# step, lands between activations, and the second step from a cold start runs out of memory above 768,
# although a single step from steady state fits up to 1102.
LIMIT = 48 * MiB
SINGLE_STEP, SURVIVING = 1102, 768
OPTIONS: dict[str, Any] = {
    "memory_limit": LIMIT,
    "emulation": "allocator",
    "precision": "bf16",
    "cache": False,
}


class Run:
    """Real training steps on one emulated device whose allocator carries from step to step."""

    def __init__(
        self, model: nn.Module, limit: int | None = LIMIT, chunks: tuple[int, ...] | None = None
    ) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.memory = DeviceMemory(CPU, limit or 8 << 30, "allocator")
        self.stepper = Stepper(model, self.optimizer, self.memory, "bf16")
        self.chunks = chunks

    def step(self, batch: int, trace: bool = False) -> Any:
        X, y = _data()
        sizes = self.chunks or (batch, batch)
        pieces = [((X[:n], y[:n]), n / sum(sizes)) for n in sizes]
        return run_step(self.stepper, lambda: pieces, trace=trace)

    def steps(self, batch: int, n: int, *, start: str) -> list[Any]:
        """``n`` consecutive steps from a cold start or from steady state (state made first, packed)."""
        if start == STEADY:
            self.step(2)  # makes the optimizer's state
            resident = self.stepper.state_tensors()
        else:
            self.optimizer.state.clear()
            resident = self.stepper.weight_tensors()
        with self.memory.carried(resident):
            return [self.step(batch) for _ in range(n)]


def _model_of(run: Run, cold_batch: int = 2, warm_batch: int = 3) -> Any:
    run.optimizer.state.clear()
    with run.memory.carried(run.stepper.weight_tensors()):
        cold = Timeline(cold_batch, *run.step(cold_batch, trace=True).trace)
    with run.memory.carried(run.stepper.state_tensors()):
        warm = Timeline(warm_batch, *run.step(warm_batch, trace=True).trace)
    model = fit_step_model(cold, [warm])
    assert model is not None
    return model


# -- the replay is the run ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [16, 300, 769, 1024])
def test_the_replay_equals_a_step_by_step_run_byte_for_byte(batch: int) -> None:
    run = Run(_mlp(), limit=None)
    model = _model_of(run)
    replay = survive(model, batch, None, allocator=True, max_steps=4)
    for start in (COLD, STEADY):
        replayed = [s for s in replay.steps if s.start == start]
        real = run.steps(batch, len(replayed), start=start)
        assert [o.step_reserved for o in real] == [s.peak for s in replayed]
        assert all(o.fitted for o in real)


def test_the_replay_of_a_plans_micro_batches_equals_the_run() -> None:
    """Accumulation as planned: 11 + 11 + 10 for a target of 32 at micro-batch 11."""
    chunks = plan(11, 32).chunks
    run = Run(_mlp(), limit=None, chunks=chunks)
    model = _model_of(run)
    replay = survive(model, 11, None, allocator=True, chunks=chunks, max_steps=3)
    real = run.steps(11, 3, start=COLD)
    assert [o.step_reserved for o in real] == [s.peak for s in replay.steps if s.start == COLD]


def test_the_replay_runs_out_of_memory_where_the_run_does() -> None:
    run = Run(_mlp())
    model = _model_of(run)
    replay = survive(model, SINGLE_STEP, LIMIT, allocator=True)
    assert replay.failure is not None and (replay.failure.start, replay.failure.step) == (COLD, 2)
    real = run.steps(SINGLE_STEP, 2, start=COLD)
    assert [o.fitted for o in real] == [True, False]
    assert run.steps(SINGLE_STEP, 1, start=STEADY)[0].fitted  # what a probe of single steps saw


def test_a_cnn_with_batchnorm_replays_exactly() -> None:
    torch.manual_seed(0)
    cnn = CNN(channels=3, size=32, width=64)
    run = Run(cnn, limit=None)

    def step(batch: int, trace: bool = False) -> Any:
        g = torch.Generator().manual_seed(0)
        X, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        return run_step(run.stepper, lambda: [((X, y), 0.5), ((X, y), 0.5)], trace=trace)

    run.step = step  # type: ignore[method-assign]
    model = _model_of(run)
    replay = survive(model, 64, None, allocator=True, max_steps=4)
    real = run.steps(64, len([s for s in replay.steps if s.start == COLD]), start=COLD)
    assert [o.step_reserved for o in real] == [s.peak for s in replay.steps if s.start == COLD]


# -- the probe's answer survives --------------------------------------------------------------------------


def test_the_probe_answers_the_batch_that_survives_training_not_one_step() -> None:
    model = _mlp()
    result = probe(model, _data(), optimizer=torch.optim.AdamW(model.parameters()), **OPTIONS)
    assert result.micro_batch == SURVIVING
    assert result.single_step_batch == SINGLE_STEP
    assert result.decided_by == "step 2 from a cold start"
    assert result.fixed_point_steps is not None and result.fixed_point_steps <= 3
    assert result.optimizer_steps <= 6 and result.ooms == 1
    assert sum(t.batch for t in result.trials) <= 3 * result.micro_batch

    # The judge: real steps, the cache carried: three from a cold start and three from steady state.
    for start in (COLD, STEADY):
        assert all(o.fitted for o in Run(_mlp()).steps(SURVIVING, 3, start=start))
    assert not all(o.fitted for o in Run(_mlp()).steps(SINGLE_STEP, 3, start=COLD))


def test_try_batch_refuses_the_single_step_answer_and_agrees_with_the_probe() -> None:
    model = _mlp()

    def fits(batch: int) -> bool:
        options = {k: v for k, v in OPTIONS.items() if k != "cache"}  # try_batch never reads the cache
        return try_batch(
            model, _data(), batch, optimizer=torch.optim.AdamW(model.parameters()), **options
        ).fitted

    assert not fits(SINGLE_STEP)
    assert fits(SURVIVING) and not fits(SURVIVING + 1)


def test_fit_at_the_probes_answer_never_backs_off_and_at_the_single_step_one_it_does() -> None:
    options = {**OPTIONS, "epochs": 1, "seed": 0, "progress": False}
    X, y = _data(4608)
    # fit's probe replays the plan's micro-batches: here the whole target survives as one (no second
    # micro-step adding onto the gradients), and training never backs off.
    probed = fit(_mlp(), (X[: 6 * SURVIVING], y[: 6 * SURVIVING]), target_batch=2 * SURVIVING, **options)
    assert probed.probe is not None and probed.probe.optimizer_steps <= 4
    assert probed.backoffs == [] and probed.optimizer_steps == 3

    options.pop("cache")  # fit does not probe with micro_batch given
    target = 2 * SINGLE_STEP
    single = fit(
        _mlp(), (X[: 2 * target], y[: 2 * target]), target_batch=target, micro_batch=SINGLE_STEP, **options
    )
    # Training's memory carries from step to step, as a GPU's: the second step runs out and backs off.
    assert [(b.step, b.from_micro) for b in single.backoffs] == [(1, SINGLE_STEP)]


# -- expandable segments ---------------------------------------------------------------------------------


def test_the_probe_says_what_expandable_segments_would_buy_and_holds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _mlp()
    default = probe(model, _data(), optimizer=torch.optim.AdamW(model.parameters()), **OPTIONS)
    assert default.alloc_conf == "default"
    assert default.expandable_batch is not None and default.expandable_batch > default.micro_batch
    assert any("expandable_segments:True would train at micro-batch" in n for n in default.survival_notes())

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    expandable = probe(model, _data(), optimizer=torch.optim.AdamW(model.parameters()), **OPTIONS)
    assert expandable.alloc_conf == "expandable_segments:True"
    assert expandable.micro_batch == default.expandable_batch
    assert expandable.expandable_batch is None


def test_a_malformed_allocator_configuration_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments=True")
    model = _mlp()
    with pytest.raises(ValueError, match="PYTORCH_CUDA_ALLOC_CONF is not a valid allocator configuration"):
        probe(model, _data(), **OPTIONS)


# -- the hole scan ------------------------------------------------------------------------------------------


def test_the_hole_scan_checks_what_it_proposes() -> None:
    """The scan strides over 9,000 batches 64 at a time; a stride lands in a hole, the batches since the last
    one that passed are scanned one by one, and the batch below the first failure is tested itself: here it
    fails the full test although the cheaper scan passed it, and the answer goes one lower."""
    hole = range(5990, 6200)
    checked: list[int] = []

    def scan(batch: int) -> bool:
        return batch <= 9000 and batch not in hole

    def fits(batch: int) -> bool:
        checked.append(batch)
        return scan(batch) and batch != 5989

    best = largest_in_regions(fits, 1, 10_000, [(1, 10_000)], scan=scan, scan_limit=64)
    assert best == 5988
    assert 5989 in checked and 5988 in checked  # what it proposed was tested, not inferred from a stride


def test_the_predictor_finds_a_hole_inside_a_region() -> None:
    """The second step from a cold start fails from 769 to 1023 while 1024 survives again: the answer is
    the batch below the first failure, as a plan whose micro-batches vary below it needs."""
    run = Run(_mlp(), limit=None)
    predictor = SurvivalPredictor(_model_of(run), allocator=True)
    assert predictor.survival(1024, LIMIT).fits and not predictor.survival(900, LIMIT).fits
    assert predictor.max_batch(LIMIT, lo=1, hi=4096) == SURVIVING


# -- what a model keeps --------------------------------------------------------------------------------


class Scratchy(nn.Module):
    """An MLP that keeps a 192 KiB tensor: as a buffer, as a plain attribute, or inside a dict of lists."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        scratch = torch.zeros(48 * 1024)
        if kind == "buffer":
            self.register_buffer("scratch", scratch)
        elif kind == "attribute":
            self.scratch = scratch
        elif kind == "nested":
            self.cache = {"parts": [scratch]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("kind", ["attribute", "nested"])
def test_a_tensor_a_model_keeps_however_it_is_referenced_counts(kind: str) -> None:
    X, y = torch.randn(1024, 32), torch.randint(0, 4, (1024,))
    options: dict[str, Any] = {"memory_limit": "512KiB", "precision": "fp32", "cache": False}
    as_buffer = probe(Scratchy("buffer"), (X, y), **options).micro_batch
    assert probe(Scratchy(kind), (X, y), **options).micro_batch == as_buffer
    assert probe(Scratchy("none"), (X, y), **options).micro_batch > as_buffer


class Leaky(nn.Module):
    """An MLP that keeps every forward's hidden activations: memory grows with every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        self.history: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.net[0](x)
        self.history.append(hidden.detach())
        return self.net[2](self.net[1](hidden))


def test_a_model_that_keeps_what_each_step_made_runs_out_instead_of_training_on() -> None:
    X, y = torch.randn(1024, 32), torch.randint(0, 4, (1024,))
    with pytest.raises(NoBatchFitsError):
        fit(
            Leaky(),
            (X, y),
            target_batch=64,
            epochs=3,
            memory_limit="512KiB",
            precision="fp32",
            cache=False,
            progress=False,
        )


# -- the probe and try_batch agree ---------------------------------------------------------------------------


class Branchy(nn.Module):
    """Above 40 samples the forward takes a larger branch: AdamW makes that branch's state only then."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.small = nn.Linear(64, 10)
        self.big = nn.Sequential(
            nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(x) if x.shape[0] > 40 else self.small(x)


@pytest.mark.parametrize("limit", ["6MiB", "7MiB"])
def test_the_probe_and_try_batch_agree_on_a_model_that_branches_on_the_batch(limit: str) -> None:
    model = Branchy()
    X, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    options: dict[str, Any] = {"memory_limit": limit, "precision": "fp32"}
    result = probe(model, (X, y), optimizer=torch.optim.AdamW(model.parameters()), cache=False, **options)
    m = result.micro_batch

    def fits(batch: int) -> bool:
        return try_batch(
            model, (X, y), batch, optimizer=torch.optim.AdamW(model.parameters()), **options
        ).fitted

    assert fits(m) and not fits(m + 1)
