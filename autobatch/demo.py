"""The demo: a small CNN on scikit-learn's bundled digits, on an emulated small device.

Everything ships with the packages (no download). The emulated device is sized so that the probed
micro-batch is below the target batch of 32 and gradient accumulation kicks in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DEMO_MEMORY_LIMIT", "DigitsCNN", "DigitsData", "load_digits_data"]

DEMO_MEMORY_LIMIT = "640.00 KiB"
"""The emulated device of the demo: small enough that a micro-batch of 32 does not fit."""


class DigitsCNN(nn.Module):
    """Two conv blocks (BatchNorm, ReLU, pooling), dropout and a linear head, for 8×8 digits."""

    def __init__(self, classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width * 4, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class DigitsData:
    """Train and held-out splits of the digits, as tensors ``(X, y)``, and the class names."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    target_names: list[str]


def load_digits_data(test_size: float = 0.25, seed: int = 0) -> DigitsData:
    """scikit-learn's 1,797 8×8 digits, scaled to [0, 1], split stratified into train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=test_size, random_state=seed, stratify=digits.target
    )
    train = (images[train_idx], labels[train_idx])
    test = (images[test_idx], labels[test_idx])
    return DigitsData(train=train, test=test, target_names=[str(n) for n in digits.target_names])
