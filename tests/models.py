"""Tiny, deterministic model and data factories shared by the tests and the benchmarks.

Three kinds, all on the CPU and fast enough to run dozens of training steps in a test:

* :func:`mlp_case`: an MLP on tensors ``(X, y)``;
* :func:`cnn_case`: a small CNN with BatchNorm2d and Dropout on ``3x16x16`` images;
* :func:`transformer_case`: a Transformer encoder classifier on variable-length token sequences
  (a map-style :class:`SequenceDataset` and :func:`pad_collate`, which pads to the longest sample).

Each factory takes a seed and returns a :class:`Case`: the model and the data in the form the probe takes.
:func:`limit_for` picks a memory limit under which a case's largest batch is about a given size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autobatch import try_batch

__all__ = [
    "CNN",
    "MLP",
    "PAD",
    "Case",
    "SequenceDataset",
    "TransformerClassifier",
    "case",
    "cnn_case",
    "limit_for",
    "mlp_case",
    "pad_collate",
    "transformer_case",
]

PAD = 0
"""The padding token id; real tokens are 1..vocab-1."""

N_CLASSES = 10


class MLP(nn.Module):
    """``Linear → ReLU → Linear → ReLU → Linear`` classifier."""

    def __init__(self, in_features: int = 32, hidden: int = 64, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """``Conv → BatchNorm → ReLU → MaxPool → Dropout → Linear`` on ``channels x size x size`` images."""

    def __init__(self, channels: int = 3, size: int = 16, width: int = 8, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
        )
        self.head = nn.Linear(width * (size // 2) ** 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TransformerClassifier(nn.Module):
    """Embedding + ``nn.TransformerEncoder`` (batch first) + masked mean pooling + a linear head.

    Takes a padded ``(batch, length)`` LongTensor of tokens and derives the padding mask from ``PAD``.
    """

    def __init__(
        self,
        vocab: int = 64,
        d_model: int = 32,
        nhead: int = 2,
        layers: int = 1,
        n_classes: int = N_CLASSES,
        max_len: int = 64,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        self.position = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=2 * d_model, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == PAD
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        h = self.encoder(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.head(pooled)


class SequenceDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``n`` token sequences of random lengths in ``[min_len, max_len]``, each with a class label."""

    def __init__(
        self, n: int = 200, *, min_len: int = 4, max_len: int = 64, vocab: int = 64, seed: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
        self.samples = [torch.randint(1, vocab, (length,), generator=g) for length in lengths]
        self.labels = torch.randint(0, N_CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.samples[i], self.labels[i]


def pad_collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the token sequences of a batch with ``PAD`` to the longest one; stack the labels."""
    tokens = nn.utils.rnn.pad_sequence([s for s, _ in samples], batch_first=True, padding_value=PAD)
    return tokens, torch.stack([label for _, label in samples])


@dataclass
class Case:
    """A model and its data, as the probe takes them."""

    name: str
    model: nn.Module
    data: Any
    size: int

    def optimizer(self, kind: str) -> torch.optim.Optimizer:
        """A fresh ``"sgd"`` or ``"adam"`` optimizer over the model's trainable parameters."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.01, momentum=0.9)
        if kind == "adam":
            return torch.optim.Adam(params, lr=1e-3)
        raise ValueError(f"unknown optimizer kind {kind!r}")


def mlp_case(n: int = 256, seed: int = 0) -> Case:
    """An MLP on ``n`` random 32-feature vectors with 10 classes."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 32, generator=g)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return Case("mlp", MLP(), (X, y), n)


def cnn_case(n: int = 256, seed: int = 0) -> Case:
    """A CNN with BatchNorm and Dropout on ``n`` random ``3x16x16`` images with 10 classes."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return Case("cnn", CNN(), (X, y), n)


def transformer_case(n: int = 200, seed: int = 0) -> Case:
    """A Transformer classifier on ``n`` variable-length sequences, as a DataLoader with padding."""
    torch.manual_seed(seed)
    dataset = SequenceDataset(n, seed=seed)
    return Case("transformer", TransformerClassifier(), DataLoader(dataset, collate_fn=pad_collate), n)


CASES: dict[str, Callable[..., Case]] = {
    "mlp": mlp_case,
    "cnn": cnn_case,
    "transformer": transformer_case,
}


def case(name: str, seed: int = 0) -> Case:
    """The case called ``name`` (``"mlp"``, ``"cnn"`` or ``"transformer"``)."""
    return CASES[name](seed=seed)


def limit_for(model: nn.Module, data: Any, target: int, *, lo: int = 8, hi: int = 16, **options: Any) -> int:
    """A memory limit (bytes) under which the largest batch that fits is about ``target``.

    Measures the forward/backward peaks at batches ``lo`` and ``hi`` under a roomy emulated limit,
    extrapolates the line through them to ``target`` and adds half a sample; the whole step's peak at
    batch 1 (the optimizer step's own peak) is a floor. The exact maximum is for the caller to find.
    """
    options = {**options, "memory_limit": "1GiB", "emulation": "ideal"}
    small = try_batch(model, data, lo, **options)
    large = try_batch(model, data, hi, **options)
    one = try_batch(model, data, 1, **options)
    assert small.backward_peak_bytes is not None and large.backward_peak_bytes is not None
    assert one.peak_bytes is not None
    slope = (large.backward_peak_bytes - small.backward_peak_bytes) / (hi - lo)
    fixed = small.backward_peak_bytes - slope * lo
    return int(max(one.peak_bytes, fixed + (target + 0.5) * slope))
