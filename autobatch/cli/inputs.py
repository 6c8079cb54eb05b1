"""What ``autobatch probe`` trains on: the model and data its specs name, or random stand-ins.

``MODEL`` names an ``nn.Module``, or a zero-argument factory returning a module, ``(model, data)`` or a
dict with ``model``, ``data`` and probe options. Without data, ``--input-shape`` (images, vectors) or
``--seq-len``/``--vocab`` (token sequences) make random samples. They are one random sample expanded along
the batch dimension: no host memory is spent on them, whatever ``--samples`` says, and for memory every
sample of a given shape weighs the same.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

import torch
from torch import nn

from autobatch.cli.spec import SpecError, load_spec
from autobatch.errors import UsageValueError

__all__ = ["build_inputs", "token_loss"]


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(batch, seq, vocab)`` logits against ``(batch, seq)`` token targets."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _call_factory(obj: Any, spec: str, what: str) -> Any:
    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise SpecError(
            f"{what} {spec!r} is a callable that needs arguments; expected an instance or a "
            "zero-argument factory."
        ) from None
    except ValueError:  # no signature (some builtins): just try the call
        pass
    return obj()


def _model(spec: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    target = load_spec(spec, "model")
    if not isinstance(target, nn.Module) and callable(target):
        target = _call_factory(target, spec, "model")
    data, options = None, {}
    if isinstance(target, dict):
        unknown = set(target) - {"model", "data"}
        options = {k: target[k] for k in unknown}
        data, target = target.get("data"), target.get("model")
    elif isinstance(target, tuple) and len(target) == 2:
        target, data = target
    if not isinstance(target, nn.Module):
        raise SpecError(
            f"model {spec!r} gave {type(target).__name__}; expected an nn.Module, a zero-argument "
            "factory returning one, (model, data), or a dict with 'model' and 'data'."
        )
    return target, data, options


def _data(spec: str) -> Any:
    data = load_spec(spec, "--data")
    is_data = isinstance(data, (torch.utils.data.Dataset, torch.utils.data.DataLoader, tuple, list))
    if callable(data) and not is_data:
        data = _call_factory(data, spec, "--data")
    return data


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise UsageValueError(f"Expected --input-shape as positive ints such as 3,224,224, but got {text!r}.")
    return shape


def _random(args: argparse.Namespace, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    n = args.samples
    generator = torch.Generator().manual_seed(0)
    if args.input_shape is not None and args.seq_len is not None:
        raise UsageValueError("Pass either --input-shape (images, vectors) or --seq-len (tokens), not both.")
    if args.seq_len is not None:
        if args.vocab is None:
            raise UsageValueError("--seq-len needs --vocab, the vocabulary size of the random tokens.")
        tokens = torch.randint(args.vocab, (1, args.seq_len), generator=generator).expand(n, -1)
        if args.num_classes is not None:  # sequence classification: one label per sequence
            return tokens, torch.randint(args.num_classes, (n,), generator=generator)
        options.setdefault("loss_fn", token_loss)  # language modelling: one target per token
        return tokens, torch.randint(args.vocab, (1, args.seq_len), generator=generator).expand(n, -1)
    if args.input_shape is None:
        raise UsageValueError(
            "No data: pass --data SPEC, have the model factory return (model, data), or give "
            "--input-shape (with --num-classes) or --seq-len with --vocab for random inputs."
        )
    shape = _shape(args.input_shape)
    inputs = torch.randn((1, *shape), generator=generator).expand(n, *shape)
    return inputs, torch.randint(args.num_classes or 10, (n,), generator=generator)


def build_inputs(args: argparse.Namespace) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The model, data and extra probe options that ``autobatch probe``'s arguments describe.

    Raises:
        SpecError: a spec cannot be resolved or names the wrong kind of object.
        ValueError: the data arguments contradict each other or are incomplete.
    """
    model, data, options = _model(args.model)
    random_inputs = args.input_shape is not None or args.seq_len is not None
    if data is not None and (args.data is not None or random_inputs):
        raise UsageValueError(
            f"model {args.model!r} already gives its data; drop --data, --input-shape and --seq-len."
        )
    if args.data is not None:
        if random_inputs:
            raise UsageValueError("Pass either --data or random inputs (--input-shape, --seq-len), not both.")
        data = _data(args.data)
    if data is None:
        data = _random(args, options)
    return model, data, options
