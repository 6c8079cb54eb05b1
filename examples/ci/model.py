"""The model that the CI smoke tests and the probe gate check.

``build()`` returns ``(model, data)``, the form ``autobatch probe MODULE:ATTR`` takes:

    autobatch probe examples.ci.model:build --memory-limit 4GiB --min-batch 16 --json

In your project, point both at your own model factory instead.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES, CLASSES, SAMPLES = 64, 10, 2048


def build_model() -> nn.Module:
    """A small MLP classifier (seeded, so every run measures the same model)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, CLASSES),
    )


def build_data(samples: int = SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(X, y)`` of the real data's shapes (for memory, only the shapes matter)."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(samples, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (samples,), generator=generator)
    return X, y


def build() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """``(model, data)`` for ``autobatch probe examples.ci.model:build``."""
    return build_model(), build_data()
