"""Tiny Hugging Face models, an in-memory tokenizer and skewed-length text data for ``tests/test_hf.py``.

Nothing is downloaded: the models are built from small configs, the tokenizer from a word-level vocabulary
made here, and the data from a seeded generator. The standard collators work on them as they do on real
ones: ``DataCollatorWithPadding`` for the classifier, ``DataCollatorForLanguageModeling(mlm=False)`` for
the causal LM (labels are ``input_ids`` with padding as -100).

Attention is ``"eager"``: plain ATen ops (matmul, softmax, dropout), the same on every CPU, so that the
emulated device counts the same bytes everywhere. Under ``"sdpa"`` (the default) PyTorch picks a kernel
by CPU features and by whether there is a mask, and the count would depend on the machine. Either way a
batch without padding gets no attention mask at all (``create_bidirectional_mask`` skips it) while a
padded one gets a 4-D ``(batch, 1, length, length)`` mask: a batch that mixes long and short samples needs
more memory than one of the longest samples alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = [
    "MAX_LEN",
    "MIN_LEN",
    "VOCAB_SIZE",
    "RecordingCollator",
    "bert_classifier",
    "classification_samples",
    "gpt2_lm",
    "lm_collator",
    "lm_samples",
    "loader",
    "padding_collator",
    "sample_lengths",
    "tokenizer",
]

VOCAB_SIZE = 1000
MIN_LEN, MAX_LEN = 5, 128
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FIRST_WORD = len(SPECIALS)
"""Token ids below this are special tokens; words are ``FIRST_WORD..VOCAB_SIZE-1``."""


def tokenizer() -> Any:
    """A word-level fast tokenizer over ``w5 … w999`` with BERT's special tokens, built in memory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, VOCAB_SIZE)})
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],
    )


def padding_collator() -> Any:
    """``DataCollatorWithPadding``: pads each batch to its own longest sample."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer())


def lm_collator() -> Any:
    """``DataCollatorForLanguageModeling(mlm=False)``: labels are the input ids, padding -100."""
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer(), mlm=False)


def bert_classifier(num_labels: int = 2, seed: int = 0, attn: str = "eager", **config: Any) -> nn.Module:
    """A 2-layer, 32-wide BERT sequence classifier (54 k parameters), seeded; ``config`` overrides the
    ``BertConfig``'s other fields (dropout off, for exact comparisons)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    settings = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_LEN,
        num_labels=num_labels,
        pad_token_id=0,
        attn_implementation=attn,
        **config,
    )
    return BertForSequenceClassification(settings)


def gpt2_lm(seed: int = 0, attn: str = "eager", **config: Any) -> nn.Module:
    """A 2-layer, 32-wide GPT-2 causal LM (62 k parameters, tied embeddings), seeded; ``config`` overrides
    the ``GPT2Config``'s other fields."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    settings = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=MAX_LEN,
        bos_token_id=SPECIALS.index("[CLS]"),
        eos_token_id=SPECIALS.index("[SEP]"),
        pad_token_id=0,
        attn_implementation=attn,
        **config,
    )
    model = GPT2LMHeadModel(settings)
    # transformers 5 derives the loss from the class name, which "GPT2LMHeadModel" does not match: it
    # would warn once and use the causal-LM loss anyway. Name it, and it says nothing.
    model.loss_type = "ForCausalLM"
    return model


def sample_lengths(n: int, seed: int = 0, *, median: int = 30, sigma: float = 1.0) -> list[int]:
    """``n`` lengths in ``[MIN_LEN, MAX_LEN]``, log-normal around ``median`` as real text is.

    Truncation piles the long tail up at ``MAX_LEN`` (27 of 384 samples with seed 0, 7 %) and the short
    tail at ``MIN_LEN`` (12, 3 %); the median is 30. A batch of up to 27 of the longest samples has no
    padding at all, so BERT builds it no attention mask.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    lengths = (math.log(median) + sigma * z).exp().round().clamp(MIN_LEN, MAX_LEN)
    return [int(v) for v in lengths]


def _tokens(length: int, g: torch.Generator) -> list[int]:
    return torch.randint(FIRST_WORD, VOCAB_SIZE, (length,), generator=g).tolist()


def classification_samples(n: int = 384, seed: int = 0, num_labels: int = 2) -> list[dict[str, Any]]:
    """``n`` samples ``{input_ids, attention_mask, labels}`` of skewed lengths with random labels."""
    g = torch.Generator().manual_seed(seed + 1)
    samples = []
    for length in sample_lengths(n, seed):
        label = int(torch.randint(0, num_labels, (), generator=g))
        samples.append({"input_ids": _tokens(length, g), "attention_mask": [1] * length, "labels": label})
    return samples


def lm_samples(n: int = 384, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` samples ``{input_ids}`` of skewed lengths, counting up by a per-sample stride.

    Each sequence starts at a random word and steps by 1, 2 or 3 (modulo the vocabulary): after the
    first two tokens the next one is predictable, so training makes the shifted token accuracy grow.
    """
    g = torch.Generator().manual_seed(seed + 1)
    words = VOCAB_SIZE - FIRST_WORD
    samples = []
    for length in sample_lengths(n, seed):
        start = int(torch.randint(0, words, (), generator=g))
        stride = int(torch.randint(1, 4, (), generator=g))
        ids = [FIRST_WORD + (start + stride * i) % words for i in range(length)]
        samples.append({"input_ids": ids})
    return samples


def loader(samples: Sequence[Mapping[str, Any]], collate_fn: Callable[[list[Any]], Any]) -> DataLoader:
    """A DataLoader of single samples: autobatch keeps its dataset and collate_fn, not its batch size."""
    return DataLoader(list(samples), collate_fn=collate_fn)


class RecordingCollator:
    """Wraps a collator and records, per call, the samples' lengths and the collated ``input_ids`` shape."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn
        self.calls: list[tuple[list[int], tuple[int, ...]]] = []

    def __call__(self, samples: list[Any]) -> Any:
        batch = self.collate_fn(samples)
        lengths = [len(s["input_ids"]) for s in samples]
        self.calls.append((lengths, tuple(batch["input_ids"].shape)))
        return batch
