"""Text models of the project's own, shaped as Hugging Face's: dict batches, padding, outputs with a loss.

No extra is needed: the core tests of padding and language models run on these, and ``tests/test_hf.py``
runs the same kinds of checks on BERT and GPT-2 where transformers is installed.

* :class:`PaddedEncoder`: one self-attention block over ``input_ids``; like BERT it builds an additive
  ``(batch, length, length)`` attention mask only when some position of the batch is padding, so a batch
  mixing long and short samples needs more memory than one of the longest alone.
* :class:`TinyCausalLM`: the same block with a causal mask and a head tied to the embedding; its loss is
  next-token cross-entropy (logits at ``t`` against the label at ``t + 1``), as a ``...ForCausalLM``'s.
* :func:`text_samples` and :func:`collate`: dict samples of skewed lengths, padded per batch with an
  attention mask; for a language model the labels are the tokens, with padding as -100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["PAD", "PaddedEncoder", "TinyCausalLM", "collate", "lm_collate", "text_samples"]

PAD = 0
VOCAB = 64
MAX_LEN = 96


class _Block(nn.Module):
    """Single-head self-attention and a feed-forward layer."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(h.shape[-1])
        if bias is not None:
            scores = scores + bias
        h = self.norm1(h + self.out(scores.softmax(-1) @ v))
        return self.norm2(h + self.ff(h))


class _Encoder(nn.Module):
    """Embeddings and two blocks. The attention bias is built once and held through the forward, as
    BERT's extended attention mask: ``(batch, length, length)``, made only where some position is padding
    (or, causal, always)."""

    def __init__(self, d: int, causal: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d, padding_idx=PAD)
        self.position = nn.Parameter(torch.randn(MAX_LEN, d) * 0.02)
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])
        self.causal = causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length = input_ids.shape
        h = self.embed(input_ids) + self.position[:length]
        lowest = torch.finfo(h.dtype).min
        bias = None
        if attention_mask is not None and not bool(attention_mask.all()):
            bias = (1.0 - attention_mask[:, None, :].to(h.dtype)).expand(batch, length, length) * lowest
        if self.causal:
            future = torch.ones(length, length, dtype=torch.bool, device=h.device).triu(1)
            bias = future * lowest if bias is None else bias.masked_fill(future, lowest)
        for block in self.blocks:
            h = block(h, bias)
        return h


class PaddedEncoder(nn.Module):
    """A sequence classifier: ``model(input_ids=..., attention_mask=..., labels=...)`` returns a dict
    with ``loss`` and ``logits``."""

    def __init__(self, classes: int = 3, d: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = _Encoder(d, causal=False)
        self.head = nn.Linear(d, classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        h = self.encoder(input_ids, attention_mask)
        keep = (input_ids != PAD).unsqueeze(-1).to(h.dtype)
        logits = self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


class TinyCausalLM(nn.Module):
    """A causal language model with a tied head; ``labels`` are scored shifted, as a ``...ForCausalLM``."""

    def __init__(self, d: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = _Encoder(d, causal=True)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        h = self.encoder(input_ids, attention_mask)
        # Tied: an untrained model "predicts" its current input token.
        logits = h @ self.encoder.embed.weight.t()
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return out


def text_samples(n: int = 160, *, classes: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` dict samples of 4 to ``MAX_LEN`` tokens, most short (log-normal lengths, median ~20), a few
    of the longest; each with a class label (the language model's collate ignores it)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(20)).round().clamp(4, MAX_LEN)
    lengths[: n // 4] = MAX_LEN  # a quarter of documents as long as the model takes
    samples = []
    for length in lengths.long().tolist():
        tokens = torch.randint(1, VOCAB, (length,), generator=g)
        samples.append({"input_ids": tokens, "labels": int(tokens[0]) % classes})
    return samples


def _padded(samples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = nn.utils.rnn.pad_sequence([s["input_ids"] for s in samples], batch_first=True, padding_value=PAD)
    return ids, (ids != PAD).long()


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad a classification batch to its longest sample: ``input_ids``, ``attention_mask``, ``labels``."""
    ids, mask = _padded(samples)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([s["labels"] for s in samples])}


def lm_collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad a language-model batch: the labels are the tokens, with padding as -100."""
    ids, mask = _padded(samples)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
