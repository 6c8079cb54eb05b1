"""Hugging Face text models: fine-tune a small BERT classifier and a small GPT-2 through ``autobatch.fit``.

Everything is built in the script, nothing is downloaded: a word-level tokenizer over a toy grammar
("the big dog sees a cat ."), models from small configs, and data of skewed lengths (most texts short,
a few truncated at 128 tokens) as real text is. The standard collators pad each micro-batch to its own
longest text: ``DataCollatorWithPadding`` for the classifier, ``DataCollatorForLanguageModeling(mlm=False)``
for the causal LM (its labels are the input ids, padding -100).

* **Classifier**: is the marker word "purple" anywhere in the text? Scored by sklearn's
  classification report.
* **Causal LM**: the grammar's next word. Scored by perplexity and next-token accuracy.

On the emulated 24 MiB device a step of 32 texts of 128 tokens does not fit: the probe finds the largest
micro-batch (with padded batches of long and short texts among its trials) and gradient accumulation
makes up the 32.

Run: ``python examples/hf_text.py`` (needs ``pip install 'autobatch[hf]'``)
"""

import math
import random

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch.utils.data import DataLoader
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

import autobatch

MEMORY_LIMIT = "24MiB"  # an emulated device on the CPU; on a GPU the CUDA allocator is capped to it
MAX_LEN = 128
MARKER = "purple"
DETERMINERS = ["the", "a", "every", "no"]
ADJECTIVES = ["big", "small", "red", "old", "happy", "quiet"]
NOUNS = ["cat", "dog", "bird", "fox", "child", "farmer", "horse", "teacher"]
VERBS = ["sees", "likes", "chases", "finds", "helps", "follows"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = SPECIALS + DETERMINERS + ADJECTIVES + NOUNS + VERBS + [MARKER, "."]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
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


def sentence(rng: random.Random, marker: bool = False) -> str:
    def noun_phrase(marked: bool) -> list[str]:
        adjective = [MARKER] if marked else [rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []
        return [rng.choice(DETERMINERS), *adjective, rng.choice(NOUNS)]

    return " ".join([*noun_phrase(marker), rng.choice(VERBS), *noun_phrase(False), "."])


def text(rng: random.Random, marker: bool = False) -> str:
    """A few sentences, log-normally many (median 4, about 30 words); the marker in one of them."""
    n = min(24, max(1, round(math.exp(rng.gauss(math.log(4), 0.9)))))
    marked = rng.randrange(n) if marker else -1
    return " ".join(sentence(rng, i == marked) for i in range(n))


def classification_data(tokenizer: PreTrainedTokenizerFast, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    texts = [text(rng, marker=rng.random() < 0.5) for _ in range(n)]
    encoded = tokenizer(texts, truncation=True, max_length=MAX_LEN)
    marker = tokenizer.convert_tokens_to_ids(MARKER)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": int(marker in ids)}  # truncation may cut it
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]


def lm_data(tokenizer: PreTrainedTokenizerFast, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    encoded = tokenizer([text(rng) for _ in range(n)], truncation=True, max_length=MAX_LEN)
    return [{"input_ids": ids} for ids in encoded["input_ids"]]


def show(name: str, result: autobatch.FitResult) -> None:
    print(f"\n== {name}")
    if result.probe is not None:
        print("probe:", result.probe.summary())
    print("plan: ", result.plan.describe())
    print(f"loss:  {result.losses[0]:.3f} → {result.losses[-1]:.3f} in {result.optimizer_steps} steps, "
          f"{len(result.backoffs)} out-of-memory back-offs, {result.train_seconds:.1f} s")  # fmt: skip


torch.manual_seed(0)
tokenizer = build_tokenizer()
common = {"target_batch": 32, "memory_limit": MEMORY_LIMIT, "device": "cpu", "seed": 0, "progress": False}

# 1. A BERT sequence classifier: DataCollatorWithPadding pads each micro-batch to its longest text.
collate = DataCollatorWithPadding(tokenizer)
bert = BertForSequenceClassification(
    BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=MAX_LEN, num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
)  # fmt: skip
result = autobatch.fit(
    bert,
    DataLoader(classification_data(tokenizer, 1024, seed=0), collate_fn=collate),
    epochs=3,
    optimizer=torch.optim.AdamW(bert.parameters(), lr=3e-3),
    eval_data=DataLoader(classification_data(tokenizer, 256, seed=1), collate_fn=collate),
    target_names=["no marker", MARKER],
    **common,
)
show("BERT classifier: does the text say 'purple'?", result)
print(result.report.text)

# 2. A GPT-2 causal LM: labels are the input ids (padding -100); the model shifts them by one.
collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
gpt2 = GPT2LMHeadModel(
    GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=MAX_LEN,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
)  # fmt: skip
gpt2.loss_type = "ForCausalLM"  # transformers 5 cannot tell from the class name, and would warn
result = autobatch.fit(
    gpt2,
    DataLoader(lm_data(tokenizer, 1024, seed=0), collate_fn=collate),
    epochs=3,
    optimizer=torch.optim.AdamW(gpt2.parameters(), lr=3e-3),
    eval_data=DataLoader(lm_data(tokenizer, 256, seed=1), collate_fn=collate),
    **common,
)
show("GPT-2 causal LM on the toy grammar", result)
print(f"perplexity by epoch: {' → '.join(f'{r.perplexity:.2f}' for r in result.evals)} "
      f"(a uniform guess over the {len(tokenizer)} words: {len(tokenizer)})")  # fmt: skip
print(f"next-token accuracy: {result.report.accuracy:.3f} over {result.report.tokens} tokens")
