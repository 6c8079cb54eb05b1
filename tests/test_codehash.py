"""Tests for autobatch.codehash: the digest follows the code a step runs, not names or source files."""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

from autobatch.codehash import code_digest, is_library


def defined(source: str, name: str, namespace: dict[str, Any] | None = None) -> Any:
    """``name`` from ``source`` executed as a module of its own, with no source file (as ``python -c``)."""
    module = types.ModuleType("user_code")
    module.__dict__.update(namespace or {})
    exec(compile(source, "<string>", "exec"), module.__dict__)
    return getattr(module, name)


def test_the_same_code_gives_the_same_digest_and_other_code_another() -> None:
    first = defined("def loss(a, b):\n    return a + b\n", "loss")
    again = defined("def loss(a, b):\n    return a + b\n", "loss")
    other = defined("def loss(a, b):\n    return a * b\n", "loss")
    assert code_digest(first) == code_digest(again) != code_digest(other)


def test_lambdas_are_told_apart_by_their_bodies() -> None:
    assert code_digest(lambda x: x + 1) != code_digest(lambda x: x + 2)
    assert code_digest(lambda x: x + 1) == code_digest(lambda x: x + 1)


def test_captured_values_and_defaults_count() -> None:
    def scaled(k: float) -> Any:
        return lambda x: x * k

    assert code_digest(scaled(2.0)) != code_digest(scaled(3.0))

    def with_default(x: int, k: int = 2) -> int:
        return x * k

    def with_other_default(x: int, k: int = 3) -> int:
        return x * k

    assert code_digest(with_default) != code_digest(with_other_default)
    assert code_digest(functools.partial(with_default, k=4)) != code_digest(
        functools.partial(with_default, k=5)
    )


HELPERS = """
def widen(x):
    return {body}

def forward(x):
    return widen(x)
"""


def test_a_helper_the_function_calls_is_part_of_its_digest() -> None:
    light = defined(HELPERS.format(body="x"), "forward")
    heavy = defined(HELPERS.format(body="x * 4"), "forward")
    assert code_digest(light) != code_digest(heavy)


def test_a_helper_reached_through_a_user_module_counts_too() -> None:
    helpers = types.ModuleType("user_helpers")
    exec("def scale(x):\n    return x * 2\n", helpers.__dict__)
    source = "def forward(x):\n    return helpers.scale(x)\n"
    before = code_digest(defined(source, "forward", {"helpers": helpers}))
    exec("def scale(x):\n    return x * 3\n", helpers.__dict__)
    assert code_digest(defined(source, "forward", {"helpers": helpers})) != before


CLASS = """
import torch
class Net(torch.nn.Module):
    copies = 1
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
    def forward(self, x):
        return self.fc({expression})
"""


def test_a_class_without_a_source_file_is_hashed_by_its_bytecode() -> None:
    a = defined(CLASS.format(expression="x"), "Net")
    b = defined(CLASS.format(expression="x"), "Net")
    c = defined(CLASS.format(expression="torch.cat([x] * 4)"), "Net")
    assert code_digest(a) == code_digest(b) != code_digest(c)


def test_class_attributes_count() -> None:
    a = defined(CLASS.format(expression="x"), "Net")
    b = defined(CLASS.format(expression="x").replace("copies = 1", "copies = 2"), "Net")
    assert code_digest(a) != code_digest(b)


def test_library_code_counts_by_name_only() -> None:
    assert is_library("torch.nn.functional") and is_library("collections") and not is_library("mypkg.models")
    assert code_digest(nn.Linear) == code_digest(nn.Linear)
    assert code_digest(torch.nn.functional.cross_entropy) != code_digest(torch.nn.functional.mse_loss)


def test_recursion_and_cycles_end() -> None:
    source = (
        "def even(n):\n    return n == 0 or odd(n - 1)\n\ndef odd(n):\n    return n != 0 and even(n - 1)\n"
    )
    assert len(code_digest(defined(source, "even"))) == 64


def test_callable_objects_count_by_their_type_and_plain_state() -> None:
    class Scaled:
        def __init__(self, k: float) -> None:
            self.k = k

        def __call__(self, x: float) -> float:
            return x * self.k

    assert code_digest(Scaled(2)) != code_digest(Scaled(3))
    assert code_digest(Scaled(2)) == code_digest(Scaled(2))


def test_a_class_held_as_a_value_counts_as_a_class_not_an_array() -> None:
    """torch.Tensor (a class) has `shape` and `dtype` attributes too: they are descriptors, not sizes."""
    source = "import torch\n\ndef kind(x, cls={cls}):\n    return isinstance(x, cls)\n"
    tensor = defined(source.format(cls="torch.Tensor"), "kind")
    parameter = defined(source.format(cls="torch.nn.Parameter"), "kind")
    assert code_digest(tensor) == code_digest(tensor) != code_digest(parameter)
