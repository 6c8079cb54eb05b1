"""CI smoke tests: does our model's training step fit the small GPU we deploy on, and does it train?

The module is marked ``memory_limit("4GiB")``: on the CPU-only CI job autobatch emulates a 4 GiB device,
on the small-GPU runner the CUDA allocator is capped to 4 GiB, so both jobs check the same budget.
The tests move the model to CUDA when there is one, so the GPU job measures the real allocator; one predicts
for the card we deploy on (``memory_limit(gpu="T4", predict=True)``), which no job needs to have.

Run: ``pytest examples/ci`` (the plugin comes with autobatch; nothing to configure).
"""

from __future__ import annotations

import pytest
import torch
from model import FEATURES, build_data, build_model  # examples/ci/model.py, next to this file

from autobatch.testing import DeviceLimit, assert_fits, assert_trains

pytestmark = pytest.mark.memory_limit("4GiB")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MICRO_BATCH = 256  # the micro-batch our training config uses
TARGET_BATCH = 512  # the effective batch
SAMPLE = (torch.randn(FEATURES), 3)  # one (input, target) sample of the real shapes


def test_training_step_fits(memory_limit: DeviceLimit) -> None:
    trial = assert_fits(build_model().to(DEVICE), SAMPLE, MICRO_BATCH)
    # Keep headroom for fragmentation and longer inputs: fail long before the device is full.
    assert trial.peak_bytes is not None and trial.peak_bytes < 0.8 * memory_limit.limit


def test_short_fit_trains() -> None:
    result = assert_trains(build_model(), build_data(), TARGET_BATCH, device=DEVICE, seed=0)
    assert result.plan.effective_batch == TARGET_BATCH
    assert not result.backoffs  # the probed micro-batch held for the whole run


@pytest.mark.memory_limit("1GiB")  # the innermost marker wins: a tighter budget for this one
def test_fits_a_smaller_device_too() -> None:
    assert_fits(build_model().to(DEVICE), SAMPLE, 64)


@pytest.mark.memory_limit(gpu="T4", predict=True)  # the card we deploy on, predicted on this runner's CPU
def test_the_micro_batch_fits_a_t4() -> None:
    trial = assert_fits(build_model(), SAMPLE, MICRO_BATCH)  # fp16 and the T4's kernels, on fake tensors
    assert trial.peak_bytes is not None


@pytest.mark.gpu
def test_fp16_step_fits_on_the_gpu(memory_limit: DeviceLimit) -> None:
    assert not memory_limit.emulated  # the real allocator, capped to 4 GiB
    trial = assert_fits(build_model().cuda(), SAMPLE, MICRO_BATCH, precision="fp16", steps=3)
    assert trial.peak_bytes is not None and trial.peak_bytes < memory_limit.limit
