"""The card table: every figure with its source, names as users and CUDA write them, the workspaces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from autobatch.errors import UsageValueError
from autobatch.memory import cards
from autobatch.memory.cards import CARDS, card, cublas_workspaces

SOURCE = Path(cards.__file__).read_text()


def _comment_above(name: str) -> str:
    """The comment lines right above the table row of ``name``."""
    lines = SOURCE.splitlines()
    row = next(i for i, line in enumerate(lines) if line.strip().startswith(f'Card("{name}"'))
    above = []
    for line in reversed(lines[:row]):
        if not line.strip().startswith("#"):
            break
        above.append(line)
    return " ".join(reversed(above))


@pytest.mark.parametrize("name", sorted(CARDS))
def test_every_figure_of_every_card_has_its_source(name: str) -> None:
    c = CARDS[name]
    comment = _comment_above(name)
    assert c.source and comment, name
    mib = c.total >> 20
    # The total, as bytes or as the MiB a printout gives, the multiprocessors and the capability.
    assert str(c.total) in comment or re.search(rf"\b{mib}\s*M", comment), (name, comment)
    assert re.search(rf"\b0*{c.sms}\b", comment), (name, comment)
    assert f"{c.sm // 10}.{c.sm % 10}" in comment or f"major={c.sm // 10}, minor={c.sm % 10}" in comment
    assert c.context < c.budget < c.total


def test_the_context_and_workspace_figures_have_their_sources() -> None:
    figures = ("CUBLAS_WORKSPACE =", "CUBLAS_WORKSPACE_SM90 =", "CUBLASLT_WORKSPACE =", "CONTEXT_SMALL =")
    for figure in figures:
        before = SOURCE.split(figure)[0].splitlines()[-6:]
        assert any(line.strip().startswith("#") for line in before), figure
    assert cards.CUBLAS_WORKSPACE == 8_519_680 and cards.CUBLAS_WORKSPACE_SM90 == 33_554_432


def test_the_issue_s_cards_are_in_the_table() -> None:
    for name in ("T4", "L4", "A10G", "RTX 3090", "RTX 4090", "A100 40GB", "A100-80GB", "H100", "H200"):
        assert card(name).name in CARDS


def test_cards_are_found_by_the_name_cuda_reports_and_by_alias() -> None:
    assert card("NVIDIA A100-SXM4-80GB").name == "A100-80GB"
    assert card("NVIDIA H100 80GB HBM3").name == "H100-80GB"
    assert card("Tesla T4").name == "T4"
    assert card("NVIDIA GeForce RTX 4090").name == "RTX-4090"
    assert card("a100").name == "A100-80GB" and card("h100").name == "H100-80GB"
    assert card("h200").total == 150_109_880_320  # measured on an H200


def test_an_unknown_card_names_the_known_ones_and_the_way_out() -> None:
    with pytest.raises(UsageValueError, match=r"one of T4, L4, .* but got 'V100'.*memory.cards.Card"):
        card("V100")
    with pytest.raises(UsageValueError, match="Expected `gpu`"):
        card(80)  # type: ignore[arg-type]


def test_the_cublas_workspaces_follow_the_capability_and_the_environment() -> None:
    assert cublas_workspaces(80, {}) == (8_519_680, 1 << 20) * 2
    assert cublas_workspaces(90, {}) == (33_554_432, 1 << 20) * 2
    assert cublas_workspaces(89, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}) == (32 << 20, 1 << 20) * 2
    assert cublas_workspaces(80, {"CUBLAS_WORKSPACE_CONFIG": ":16:8:4096:2"}) == (8_519_680, 1 << 20) * 2
    unified = {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "1", "CUBLAS_WORKSPACE_CONFIG": "junk"}
    assert cublas_workspaces(75, unified) == (8_519_680,) * 2  # junk: PyTorch's default
    assert cublas_workspaces(75, {"CUBLASLT_WORKSPACE_SIZE": "0"}) == (8_519_680,) * 2


def test_a_card_of_ones_own_is_checked_and_passes_as_itself() -> None:
    measured = cards.Card("V100-32GB", 34_089_730_048, 70, 80, "measured", context_bytes=300 << 20)
    assert card(measured) is measured and measured.context == 300 << 20
    assert measured.budget == 34_089_730_048 - (300 << 20)
    assert cards.Card("X", 16 << 30, 80, 40, "datasheet").context == cards.CONTEXT_SMALL
    with pytest.raises(UsageValueError, match=r"card's `sm` to be a positive int, but got 0"):
        cards.Card("X", 16 << 30, 0, 40, "datasheet")
    with pytest.raises(UsageValueError, match=r"`context_bytes` to be an int ≥ 0, but got -1"):
        cards.Card("X", 16 << 30, 80, 40, "datasheet", context_bytes=-1)
    with pytest.raises(UsageValueError, match=r"CUDA context .* below its memory"):
        cards.Card("X", 1 << 20, 80, 40, "datasheet")
