"""Tests for autobatch.cache.codehash: the digest follows the code a step runs, not names or source files."""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from autobatch.cache.codehash import code_digest, is_library
from autobatch.cache.valuehash import MAX_NODES


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


# -- the walk ends on every value (issue 18, defect 5) -------------------------------------------------------


def capturing(value: Any) -> Any:
    """A step function whose closure holds ``value``, as a user's would."""
    return lambda model, batch: model(batch[0]).sum() * len(value)


def nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def test_self_referencing_lists_and_dicts_are_hashed() -> None:
    first: list[Any] = [1, 2]
    first.append(first)
    other: list[Any] = [1, 3]
    other.append(other)
    table: dict[str, Any] = {"copies": 2}
    table["self"] = table
    for value in (first, table):
        assert len(code_digest(capturing(value))) == 64
        assert code_digest(capturing(value)) == code_digest(capturing(value))
    assert code_digest(capturing(first)) != code_digest(capturing(other))  # what was seen still counts


def test_a_list_nested_5000_deep_is_hashed_to_the_depth_budget(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="autobatch.cache.valuehash"):
        deep = code_digest(capturing(nested(5000, 1)))
    assert "walk was cut" in caplog.text and "depth" in caplog.text
    assert deep == code_digest(capturing(nested(5000, 1)))
    assert code_digest(capturing([nested(5000, 1), 2])) != code_digest(capturing([nested(5000, 1), 3]))
    chain = types.SimpleNamespace(next=None)
    for _ in range(5000):  # a linked list: objects nested as deep
        chain = types.SimpleNamespace(next=chain)
    assert len(code_digest(capturing(chain))) == 64


def test_a_huge_value_is_hashed_to_the_size_budget(caplog: pytest.LogCaptureFixture) -> None:
    big = list(range(MAX_NODES * 3))
    with caplog.at_level(logging.DEBUG, logger="autobatch.cache.valuehash"):
        first = code_digest(capturing(big))
    assert "size" in caplog.text
    assert first == code_digest(capturing(list(big)))
    assert first != code_digest(capturing([-1, *big]))  # the items seen count
    many = {str(i): i for i in range(MAX_NODES * 2)}  # past the budget: by its length, whatever the order
    assert code_digest(capturing(many)) == code_digest(capturing(dict(reversed(many.items()))))


def test_a_value_shared_twice_hashes_as_two_copies() -> None:
    """The visited set reuses a digest, so sharing (which varies with how a value was built) never counts."""
    shared = [1, 2]
    assert code_digest(capturing([shared, shared])) == code_digest(capturing([[1, 2], [1, 2]]))


# -- what a step reads (issue 18, defect 1) ------------------------------------------------------------------


def test_a_global_constant_the_code_reads_counts() -> None:
    forward = defined("COPIES = 1\ndef forward(x):\n    return [x] * COPIES\n", "forward")
    before = code_digest(forward)
    forward.__globals__["COPIES"] = 4
    assert code_digest(forward) != before
    forward.__globals__["COPIES"] = 1
    assert code_digest(forward) == before


def test_a_global_the_code_writes_is_its_state_not_its_setup() -> None:
    step = defined("calls = 0\ndef step(x):\n    global calls\n    calls += 1\n    return x\n", "step")
    before = code_digest(step)
    step(1)
    assert step.__globals__["calls"] == 1 and code_digest(step) == before


def test_a_bound_method_counts_with_its_instance() -> None:
    class Trainer:
        def __init__(self, copies: int) -> None:
            self.copies = copies

        def step(self, model: Any, batch: Any) -> Any:
            return model(batch) * self.copies

    assert code_digest(Trainer(1).step) == code_digest(Trainer(1).step) != code_digest(Trainer(4).step)


def test_an_object_holding_a_list_counts_with_the_list() -> None:
    class Holder:
        def __init__(self, sizes: list[int]) -> None:
            self.sizes = sizes

    assert code_digest(capturing(Holder([8]))) == code_digest(capturing(Holder([8])))
    assert code_digest(capturing(Holder([8]))) != code_digest(capturing(Holder([8, 8])))


def test_an_object_whose_attribute_access_raises_is_read_past_it() -> None:
    class Guarded:
        def __init__(self, copies: int) -> None:
            self.copies = copies

        def __getattribute__(self, name: str) -> Any:
            raise RuntimeError(f"no access to {name}")

        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    assert code_digest(capturing(Guarded(1))) == code_digest(capturing(Guarded(1)))
    assert code_digest(capturing(Guarded(1))) != code_digest(capturing(Guarded(2)))


class _Lazy(list):  # type: ignore[type-arg]
    """A user's list that cannot be iterated yet (and a mapping that would import on ``items()``)."""

    def __iter__(self) -> Any:
        raise RuntimeError("not loaded")


class _LazyMap(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        raise RuntimeError("would import every model module")


def test_containers_are_read_as_built_ins_never_through_their_own_methods() -> None:
    assert code_digest(capturing(_Lazy([1, 2]))) == code_digest(capturing(_Lazy([1, 2])))
    assert code_digest(capturing(_Lazy([1, 2]))) != code_digest(capturing(_Lazy([1, 2, 3])))
    assert code_digest(capturing(_LazyMap(a=1))) != code_digest(capturing(_LazyMap(a=2)))


def test_tensors_count_by_shape_and_dtype_never_their_data() -> None:
    assert code_digest(capturing(torch.zeros(3))) == code_digest(capturing(torch.ones(3)))
    assert code_digest(capturing(np.zeros(3))) == code_digest(capturing(np.ones(3)))
    assert code_digest(capturing(np.float32(0.5))) != code_digest(capturing(np.float32(0.25)))  # a setting
    assert code_digest(capturing(torch.zeros(3))) != code_digest(capturing(torch.zeros(4)))
    assert code_digest(capturing(torch.zeros(3))) != code_digest(capturing(torch.zeros(3).double()))
