"""``autobatch.predict``: the probe's answer without its steps at full size.

At a limit the host can run, a prediction (host kernels, fake tensors) equals ``autobatch.probe``'s answer
on the emulated device, in both emulations, for a CNN with BatchNorm, a transformer encoder, MLPs and a
padded-text model. Its fake traces equal the real ones event for event. Where the step reads its
activations, or its traced steps do not line up, it says so and falls back; the user's model, optimizer
and generators are left as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import autobatch
from autobatch.errors import NoBatchFitsError, PredictionError, UsageTypeError, UsageValueError
from autobatch.memory.cards import CARDS, Card
from autobatch.options import Options
from autobatch.probing.fake import fake_session
from autobatch.probing.prober import Prober
from autobatch.session import resolve
from autobatch.step.state import preserved_rng
from tests.models import CNN, TransformerClassifier, cnn_case, mlp_case, transformer_case
from tests.text_models import PaddedEncoder, collate, text_samples

ROOT = Path(__file__).resolve().parents[2]
MiB, KiB = 1 << 20, 1 << 10


class Encoder(nn.Module):
    """A transformer encoder classifier on fixed-length token ids (``nn.TransformerEncoder``)."""

    def __init__(self, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(500, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def _tensors(n: int, shape: tuple[int, ...], classes: int = 10, *, tokens: int = 0) -> Any:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, tokens, (n, *shape), generator=g) if tokens else torch.randn(n, *shape, generator=g)
    return x, torch.randint(0, classes, (n,), generator=g)


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make()


CASES = {  # model, data, optimizer, limit, emulation, precision
    "mlp, ideal": (lambda: mlp_case().model, mlp_case().data, "adam", 148 * KiB, "ideal", "fp32"),
    "mlp 512-1024-1024, allocator": (
        lambda: nn.Sequential(
            nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        ),
        _tensors(1024, (512,)),
        "adamw",
        44 * MiB,
        "allocator",
        "fp32",
    ),
    "cnn with BatchNorm, ideal": (
        lambda: cnn_case().model,
        cnn_case().data,
        "adam",
        660 * KiB,
        "ideal",
        "fp32",
    ),
    "cnn with BatchNorm 32x32, allocator, bf16": (
        lambda: CNN(channels=3, size=32, width=64),
        _tensors(256, (3, 32, 32)),
        "adam",
        28 * MiB,
        "allocator",
        "bf16",
    ),
    "transformer encoder, allocator": (
        Encoder,
        _tensors(256, (64,), tokens=500),
        "adamw",
        24 * MiB,
        "allocator",
        "fp32",
    ),
    "transformer encoder, ideal, bf16": (
        Encoder,
        _tensors(256, (64,), tokens=500),
        "adamw",
        12 * MiB,
        "ideal",
        "bf16",
    ),
    "padded text, ideal": (
        TransformerClassifier,
        transformer_case().data,
        "adam",
        4352 * KiB,
        "ideal",
        "fp32",
    ),
    "padded text where the padded case decides, ideal, bf16": (
        PaddedEncoder,
        DataLoader(text_samples(), collate_fn=collate),
        "adamw",
        6 * MiB,
        "ideal",
        "bf16",
    ),
    "padded text, allocator, bf16": (
        TransformerClassifier,
        transformer_case().data,
        "adam",
        8 * MiB,
        "allocator",
        "bf16",
    ),
}


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    return (torch.optim.AdamW if kind == "adamw" else torch.optim.Adam)(model.parameters(), lr=1e-3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_prediction_at_a_limit_the_host_runs_equals_the_probe(name: str) -> None:
    make, data, kind, limit, emulation, precision = CASES[name]
    options = {"memory_limit": limit, "emulation": emulation, "precision": precision}
    model = _seeded(make)
    probed = autobatch.probe(
        model, data, optimizer=_optimizer(kind, model), device="cpu", cache=False, **options
    )
    model = _seeded(make)
    size = len(data[0]) if isinstance(data, tuple) else len(data.dataset)
    predicted = autobatch.predict(model, data, optimizer=_optimizer(kind, model), max_batch=size, **options)
    assert predicted.predicted and predicted.kernels == "host" and predicted.gpu is None
    assert predicted.max_fitting_batch == probed.max_fitting_batch, name
    assert predicted.micro_batch == probed.micro_batch
    assert predicted.decided_by == probed.decided_by
    assert predicted.budget_bytes == limit == predicted.memory_limit
    assert all(t.role in ("cold", "steady") for t in predicted.trials)  # no step at the answer ran
    assert not any("real tensors" in note for note in predicted.prediction_notes)  # the fake path answered


def _traces(make: Callable[[], nn.Module], data: Any, *, fake: bool, **options: Any) -> tuple[Any, ...]:
    """The probe's cold trace at 2 and steady trace at 3, on real or fake tensors."""
    model = _seeded(make)
    parsed = Options.parse(
        "probe", {"device": "cpu", "cache": False, "optimizer": _optimizer("adamw", model), **options}
    )
    session = resolve(model, data, parsed)
    with preserved_rng(), fake_session(session) if fake else contextlib.nullcontext(), session.start():
        prober = Prober(session, values=not fake)
        with contextlib.nullcontext() if fake else prober.restoring():
            session.model.train()
            prober.trials.trace_cold(2)
            prober.trials.warm(3)
            if prober.padded(3):
                prober.trials.warm(3, "mixed")
            traces = prober.trials.cold_traces["longest"], prober.trials.warm_traces
            return traces[0][2], traces[1]["longest"][3], traces[1]["mixed"].get(3)


TRACED = {
    "mlp": (lambda: mlp_case().model, mlp_case().data, "fp32"),
    "cnn with BatchNorm": (lambda: CNN(channels=3, size=16, width=8), _tensors(16, (3, 16, 16)), "bf16"),
    "transformer encoder": (Encoder, _tensors(16, (64,), tokens=500), "bf16"),
    "padded text": (PaddedEncoder, DataLoader(text_samples(), collate_fn=collate), "bf16"),
}


@pytest.mark.parametrize("name", sorted(TRACED))
@pytest.mark.parametrize("emulation", ["ideal", "allocator"])
def test_fake_traces_equal_real_ones_event_for_event(name: str, emulation: str) -> None:
    # A meta kernel's dtypes or strides drifting from the CPU kernel's would show here first.
    make, data, precision = TRACED[name]
    options = {"memory_limit": 512 * MiB, "emulation": emulation, "precision": precision}
    real = _traces(make, data, fake=False, **options)
    fake = _traces(make, data, fake=True, **options)
    for a, b in zip(real, fake, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.resident == b.resident and a.events == b.events, name


# -- what a prediction for a card holds ---------------------------------------------------------------------
def test_a_prediction_for_a_card_holds_its_budget_workspaces_and_kernels() -> None:
    t4 = CARDS["T4"]
    model, data = mlp_case().model, mlp_case().data
    result = autobatch.predict(model, data, gpu="t4", max_batch=64)
    assert (result.gpu, result.device, result.kernels, result.precision) == ("T4", "cuda", "cuda:7.5", "fp16")
    assert result.budget_bytes == t4.budget == t4.total - t4.context and result.memory_limit is None
    assert result.trials[0].peak_bytes >= 2 * (8_519_680 + (1 << 20))  # the cuBLAS workspaces are resident
    notes = " ".join(result.prediction_notes)
    assert (
        "14.74 GiB as CUDA reports it" in notes
        and "384.00 MiB" in notes
        and "14.37 GiB for the allocator" in notes
    )
    assert "not modelled" in notes and result.summary().endswith("(predicted)")
    capped = autobatch.predict(model, data, gpu="T4", memory_limit="64MiB", max_batch=64)
    assert capped.budget_bytes == capped.memory_limit == 64 * MiB  # a cap on the card's allocator
    assert "capped by memory_limit=64.00 MiB" in " ".join(capped.prediction_notes)
    with pytest.raises(
        NoBatchFitsError, match=r"fits on a T4 \(16.00 MiB for .* Try memory_limit='24.00 MiB' or"
    ):
        autobatch.predict(model, data, gpu="T4", memory_limit="16MiB")  # less than the workspaces


def test_a_card_the_table_lacks_is_given_as_a_card() -> None:
    v100 = Card("V100-32GB", 34_089_730_048, 70, 80, "measured on our V100", context_bytes=300 * MiB)
    result = autobatch.predict(mlp_case().model, mlp_case().data, gpu=v100, max_batch=64)
    assert (result.gpu, result.kernels, result.budget_bytes) == ("V100-32GB", "cuda:7.0", v100.budget)
    assert "300.00 MiB of it outside the caching allocator (as given)" in result.prediction_notes[0]


def test_cuda_s_kernels_make_room_that_the_host_s_would_not() -> None:
    # The same budget and precision: CUDA's fused attention holds no B·H·L² scores, and its dropout a bool
    # mask; the host's math path holds both.
    data = _tensors(64, (256,), tokens=500)
    options = {"memory_limit": 64 * MiB, "precision": "fp16", "max_batch": 4096}
    on_the_card = autobatch.predict(_seeded(Encoder), data, gpu="A100-80GB", **options)
    on_the_host = autobatch.predict(_seeded(Encoder), data, emulation="allocator", **options)
    assert "attention: flash × 8" in " ".join(on_the_card.prediction_notes)  # 2 layers, 4 forwards
    assert on_the_card.max_fitting_batch > 1.5 * on_the_host.max_fitting_batch


def test_nothing_fits_on_a_card_names_the_smallest_card_that_holds_it() -> None:
    with torch.device("meta"):  # 1.07 billion parameters: 16 GiB of state in AdamW, no host memory
        model = nn.Sequential(*[nn.Linear(8192, 8192) for _ in range(16)])
    data = (torch.randn(4, 8192), torch.randn(4, 8192))
    fits = (
        r"fits on a T4 \(14.37 GiB for the caching allocator\).*smallest in the table that holds it: RTX-4090"
    )
    with pytest.raises(NoBatchFitsError, match=fits) as caught:
        autobatch.predict(model, data, gpu="T4", loss_fn=nn.functional.mse_loss)
    assert caught.value.needed_bytes is not None and caught.value.needed_bytes > 16 << 30


# -- where a prediction cannot be trusted --------------------------------------------------------------------
class Branchy(nn.Module):
    """Python control flow on an activation's value."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 256), nn.Linear(256, 10), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).relu()
        return self.b(h) if h.sum() > 0 else self.c(h)


class Masked(nn.Module):
    """A shape that depends on values: boolean indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) + h[h > 0].mean()


class BatchParity(nn.Module):
    """Control flow on the batch size: two traced steps do not line up."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 256)
        self.b = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h * 2 if x.shape[0] % 2 else h.relu())


DATA = _tensors(512, (16,))
LIMIT = {"memory_limit": 2 * MiB, "emulation": "allocator", "precision": "fp32", "max_batch": 512}


@pytest.mark.parametrize(("cls", "line"), [(Branchy, "if h.sum() > 0"), (Masked, "h[h > 0]")])
def test_a_model_that_reads_its_activations_falls_back_to_real_tensors_and_says_where(
    cls: type, line: str
) -> None:
    probed = autobatch.probe(_seeded(cls), DATA, device="cpu", cache=False, **LIMIT)
    predicted = autobatch.predict(_seeded(cls), DATA, **LIMIT)
    # Traced for real at 2 and 3: a shape that depends on values (how many are positive) is extrapolated.
    assert abs(predicted.max_fitting_batch - probed.max_fitting_batch) <= 0.01 * probed.max_fitting_batch
    assert probed.max_fitting_batch < 512
    note = next(n for n in predicted.prediction_notes if "reads values of its activations" in n)
    assert "test_prediction.py:" in note and line in note and "traced on real tensors" in note
    assert autobatch.predict(_seeded(cls), DATA, gpu="T4", max_batch=64).max_fitting_batch == 64
    with torch.device("meta"):
        on_meta = cls()
    with pytest.raises(
        PredictionError, match=rf"reads values of its activations .*{re.escape(line)}.*meta device"
    ):
        autobatch.predict(on_meta, DATA, gpu="H100")


def test_traced_steps_that_do_not_line_up_search_as_the_probe_does_on_fake_tensors() -> None:
    probed = autobatch.probe(_seeded(BatchParity), DATA, device="cpu", cache=False, **LIMIT)
    predicted = autobatch.predict(_seeded(BatchParity), DATA, **LIMIT)
    assert predicted.max_fitting_batch == probed.max_fitting_batch < 512
    assert any("do not line up" in n and "fake tensors" in n for n in predicted.prediction_notes)
    on_the_card = autobatch.predict(_seeded(BatchParity), DATA, gpu="H200")  # a card's budget: no error
    assert on_the_card.max_fitting_batch == len(DATA[0])  # the search's batches are the data's


# -- the user's things, and refusals -------------------------------------------------------------------------
def test_the_model_optimizer_and_generators_are_left_untouched() -> None:
    import random

    import numpy as np

    case = cnn_case()  # BatchNorm (running statistics) and Dropout (draws)
    model, optimizer = case.model, torch.optim.Adam(case.model.parameters())
    autobatch.try_batch(model, case.data, 4, memory_limit="4MiB", optimizer=optimizer)  # no state kept
    model(case.data[0][:4]).sum().backward()
    optimizer.step()  # now it holds state, and the model gradients
    torch.optim.lr_scheduler.StepLR(optimizer, 1)  # wraps optimizer.step in an instance attribute
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    autobatch.predict(model, case.data, gpu="A100-40GB", optimizer=optimizer, max_batch=64)
    autobatch.predict(model, case.data, memory_limit="2MiB", optimizer=optimizer)
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert {id(p): set(s) for p, s in optimizer.state.items()} == {k: set(v) for k, v in state.items()}
    assert all(torch.equal(state[id(p)][k], v) for p, s in optimizer.state.items() for k, v in s.items())
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert (np.random.get_state()[1] == rng[2]).all()


def test_bad_calls_are_refused_naming_the_argument() -> None:
    model, data = mlp_case().model, mlp_case().data
    with pytest.raises(UsageValueError, match=r"Expected `gpu` or `memory_limit`, but got neither"):
        autobatch.predict(model, data)
    with pytest.raises(UsageValueError, match=r"Expected `gpu` to be one of T4, .* but got 'V100'"):
        autobatch.predict(model, data, gpu="V100")
    with pytest.raises(UsageValueError, match=r"no `emulation='ideal'` with `gpu='T4'`"):
        autobatch.predict(model, data, gpu="T4", emulation="ideal")
    with pytest.raises(UsageTypeError, match=r"predict\(\) got an unexpected keyword argument `device`"):
        autobatch.predict(model, data, gpu="T4", device="cuda")
    with pytest.raises(UsageValueError, match=r"at least 3 samples: a prediction traces steps at 2 and 3"):
        autobatch.predict(model, (data[0][:2], data[1][:2]), gpu="T4")


def test_a_predicted_result_reads_back_from_its_dict() -> None:
    result = autobatch.predict(mlp_case().model, mlp_case().data, gpu="L4", max_batch=32)
    again = autobatch.ProbeResult.from_dict(result.to_dict())
    assert again == result and again.prediction_notes == result.prediction_notes
    with pytest.raises(TypeError, match=r"`prediction_notes` to be a list of str"):
        autobatch.ProbeResult.from_dict({**result.to_dict(), "prediction_notes": [1]})


def test_the_fake_path_never_allocates_at_full_size() -> None:
    # A billion parameters on the meta device, for an 80 GiB card: 16 GiB of model state and a step at the
    # answer would need tens of GiB; the prediction adds less than 512 MiB to the process, measured.
    script = textwrap.dedent(
        """
        import json, torch, autobatch
        from torch import nn

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) << 10

        small = nn.Linear(8, 2)  # first use of the fake machinery (its imports) before the baseline
        autobatch.predict(small, (torch.randn(4, 8), torch.randint(0, 2, (4,))), gpu="H100", max_batch=4)
        with torch.device("meta"):
            model = nn.Sequential(*[nn.Linear(8192, 8192) for _ in range(16)], nn.Linear(8192, 10))
        data = (torch.randn(4, 8192), torch.randint(0, 10, (4,)))
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM restarts from VmRSS
        result = autobatch.predict(model, data, gpu="H100", max_batch=1024)
        print(json.dumps({"extra": status("VmHWM") - before, "state": result.model_state_bytes,
                          "batch": result.max_fitting_batch}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["state"] > 16 << 30 and measured["batch"] == 1024
    assert measured["extra"] < 512 * MiB, measured


def test_the_readme_s_example_runs_and_prints_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Will it fit on …?", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    said = re.search(r"# T4 (\d+) ([\d.]+ GiB); L4 (\d+)", code)
    assert said is not None
    assert printed[0] == f"T4 {said[1]} {said[2]}" and printed[1].startswith(f"L4 {said[3]} ")
    assert printed[2].startswith("L4: 21.95 GiB as CUDA reports it")
