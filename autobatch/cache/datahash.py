"""What a dataset and its collate function contribute to the probe cache's key: never the samples.

A dataset's transform (torchvision's ``transform=``), its settings (a maximum length, a crop size) and its
class's code change the samples a step gets, and so its memory; its data (gigabytes, perhaps) does not
belong in a key. :class:`DataDigest` hashes a dataset's class by its code and its attributes by these rules:
plain values and tensors (by shape) as :mod:`autobatch.cache.valuehash` does; callables (a transform object, a
function) in full; nested datasets and the user's objects by the same rules; a container of more than
:data:`DATA_ITEMS` items by its type and length only (that is the data); other libraries' objects (a
table, a data frame) by their type only.

Example:
    >>> class Rows:
    ...     def __init__(self, n, scale):
    ...         self.rows, self.scale = list(range(n)), scale
    >>> data_digest(Rows(1000, 2)) == data_digest(Rows(2000, 2)), data_digest(Rows(1000, 3)) == data_digest(
    ...     Rows(1000, 2))
    (False, False)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autobatch.cache.codehash import Digest
from autobatch.cache.valuehash import (
    CODE,
    CONTAINERS,
    PLAIN,
    TORCH_NAMES,
    attributes,
    is_array,
    is_instance,
    is_library,
    is_stdlib,
    items_of,
    qualname,
    sorted_items,
)

__all__ = ["DATA_ITEMS", "DataDigest", "data_digest"]

DATA_ITEMS = 64
"""A dataset's container with more items than this is its data: hashed by type and length only."""


class DataDigest(Digest):
    """A :class:`~autobatch.cache.codehash.Digest` that also hashes datasets and collate functions."""

    def data(self, value: Any) -> None:
        """Hash what a dataset holds that steers a sample, never its data: the type, plain attributes,
        callables (a ``transform=``) and nested datasets; a large container by its type and length."""
        if is_instance(value, (*PLAIN, *TORCH_NAMES, torch.Tensor, nn.Module, *CODE)) or is_array(value):
            self.value(value)
        elif is_instance(value, CONTAINERS):
            items = items_of(value)
            if len(items) > DATA_ITEMS:
                self.text("data", qualname(value), len(items))
            else:
                self.node(value, lambda v: self.container(v, self.data), "data")
        elif is_stdlib(value) or (is_library(type(value).__module__) and not callable(value)):
            self.text("object", qualname(value))  # a table or a frame of the data: never read
        else:  # a dataset, a transform object, a user object: its class and what it holds, by these rules
            self.node(value, self._dataset, "data")

    def _dataset(self, value: Any) -> None:
        self.add(type(value))
        for name, attribute in sorted_items(attributes(value)):
            self.text("attribute", name)
            self.data(attribute)


def data_digest(*values: Any) -> str:
    """The SHA-256 hex digest of datasets and collate functions: their code, settings and transforms,
    never their samples."""
    digest = DataDigest()
    for value in values:
        digest.data(value)
    return digest.hexdigest()
