"""Tests for autobatch.export: another trainer's settings from a probe, exact and saying what they cost."""

from __future__ import annotations

import pytest

from autobatch import plan
from autobatch.errors import UsageValueError
from autobatch.export import TOOLS, trainer_config
from autobatch.result import ProbeResult


def probed(micro: int, precision: str = "bf16", optimizer: str | None = "AdamW") -> ProbeResult:
    return ProbeResult(micro, micro, micro + 1, None, "cuda:0", precision, None, "none", optimizer=optimizer)


MICRO_KEYS = {
    "hf": ("per_device_train_batch_size", "gradient_accumulation_steps"),
    "lightning": ("batch_size", "accumulate_grad_batches"),
    "deepspeed": ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"),
    "accelerate": ("batch_size", "gradient_accumulation_steps"),
}


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize(
    ("micro", "target", "world", "expected"),
    [(11, 32, 1, (8, 4)), (16, 32, 1, (16, 2)), (7, 30, 2, (5, 3)), (13, 24, 1, (12, 2)), (1, 7, 1, (1, 7))],
)
def test_the_settings_train_exactly_the_target_within_the_probed_micro_batch(
    tool: str, micro: int, target: int, world: int, expected: tuple[int, int]
) -> None:
    config = trainer_config(probed(micro), tool, target_batch=target, world_size=world)
    size, steps = (config.settings[k] for k in MICRO_KEYS[tool])
    assert (size, steps) == expected
    assert size * steps * world == target and size <= micro
    # The largest divisor of the per-rank batch not above the micro-batch: nothing larger is exact.
    per_rank = target // world
    assert not any(per_rank % d == 0 for d in range(size + 1, micro + 1))


def test_an_uneven_plan_says_what_the_equal_split_costs() -> None:
    config = trainer_config(probed(11), "hf", target_batch=32)
    assert config.notes[0] == (
        "equal micro-batches of 8 (the probe allows 11, as 11+11+10): "
        "4 micro-steps a step instead of 3 (+33%)"
    )
    even = trainer_config(probed(16), "hf", target_batch=32)
    assert not any("equal micro-batches" in n for n in even.notes)


@pytest.mark.parametrize(
    ("precision", "hf", "lightning", "deepspeed", "accelerate"),
    [
        ("bf16", {"bf16": True, "fp16": False}, "bf16-mixed", {"bf16": {"enabled": True}}, "bf16"),
        ("fp16", {"bf16": False, "fp16": True}, "16-mixed", {"fp16": {"enabled": True}}, "fp16"),
        ("fp32", {"bf16": False, "fp16": False}, "32-true", {}, "no"),
    ],
)
def test_the_precision_measured_is_set_where_the_tool_has_a_setting(
    precision: str, hf: dict[str, bool], lightning: str, deepspeed: dict[str, object], accelerate: str
) -> None:
    result = probed(16, precision)
    assert hf.items() <= trainer_config(result, "hf", target_batch=32).settings.items()
    assert trainer_config(result, "lightning", target_batch=32).settings["precision"] == lightning
    settings = trainer_config(result, "deepspeed", target_batch=32).settings
    assert {k: v for k, v in settings.items() if k in ("fp16", "bf16")} == deepspeed
    assert trainer_config(result, "accelerate", target_batch=32).settings["mixed_precision"] == accelerate
    for tool in TOOLS:
        assert f"measured in {precision}" in " ".join(trainer_config(result, tool, target_batch=32).notes)


def test_the_optimizer_measured_is_set_or_said() -> None:
    assert trainer_config(probed(16), "hf", target_batch=32).settings["optim"] == "adamw_torch"
    assert trainer_config(probed(16, optimizer="SGD"), "hf", target_batch=32).settings["optim"] == "sgd"
    assert trainer_config(probed(16), "deepspeed", target_batch=32).settings["optimizer"] == {"type": "AdamW"}
    for tool in ("lightning", "accelerate"):
        notes = " ".join(trainer_config(probed(16), tool, target_batch=32).notes)
        assert "measured with AdamW" in notes
    exotic = trainer_config(probed(16, optimizer="Lion"), "hf", target_batch=32)
    assert "optim" not in exotic.settings and "measured with Lion" in " ".join(exotic.notes)


def test_a_plan_exports_too_and_uneven_plans_no_longer_fail() -> None:
    config = plan(11, 32).to_config("lightning")
    assert config.settings == {"batch_size": 8, "accumulate_grad_batches": 4}
    assert config.to_dict()["notes"][0].startswith("equal micro-batches of 8")
    assert probed(11).to_config("lightning", 32).settings["precision"] == "bf16-mixed"


def test_an_unknown_tool_or_target_is_refused_naming_it() -> None:
    with pytest.raises(UsageValueError, match="Expected `tool` to be one of 'hf', 'lightning'"):
        trainer_config(probed(8), "keras", target_batch=32)
    with pytest.raises(UsageValueError, match="target_batch"):
        trainer_config(probed(8), "hf", target_batch=33, world_size=2)
