"""What a module contributes to the probe cache's key: what steers its forward, not torch's bookkeeping.

Every submodule counts by its name, its class (by the class's code), its parameters and buffers (by
name, shape, dtype and ``requires_grad``), its own attributes whatever they hold (a private ``_copies``, a
config dict or object, a function stored as an attribute) and its hooks: forward hooks and pre-hooks
(with their ``with_kwargs`` and ``always_call`` flags) and backward hooks, each by its code in the order
it runs. Hook dicts are keyed by handle ids that count up through a process: the key never holds them.
State-dict hooks and torch's other internals never run in a step and are left out.

Example:
    >>> import torch
    >>> first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    >>> handle = second.register_forward_hook(lambda module, args, out: out.relu())
    >>> from autobatch.cache.codehash import value_digest
    >>> same, hooked = value_digest(torch.nn.Linear(4, 4)), value_digest(second)
    >>> value_digest(first) == same, value_digest(first) == hooked
    (True, False)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autobatch.cache.valuehash import PLAIN, ValueWalk, attributes, is_instance, tensor_parts

__all__ = ["ModuleWalk"]

# What torch keeps on every module for itself: the walk reads these its own way, or not at all (state-dict
# hooks never run in a step).
_MODULE_INTERNALS = frozenset(
    {
        "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
        "_compiled_call_impl", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    }
)  # fmt: skip
_HOOK_FLAGS = ("_with_kwargs", "_always_called")  # {handle id: True} beside the hook dict they qualify


class ModuleWalk(ValueWalk):
    """A :class:`~autobatch.cache.valuehash.ValueWalk` that hashes a module by what steers its forward."""

    def _describe(self, value: Any) -> None:
        if is_instance(value, nn.Module):
            self.module(value)
        else:
            super()._describe(value)

    def module(self, model: nn.Module) -> None:
        """Every submodule: its name, class (by its code), parameters, buffers, attributes and hooks."""
        for name, module in model.named_modules():
            own = attributes(module)
            children = own.get("_modules") or {}
            parts: list[object] = ["module", name, len(children), *children]  # one update: 10,000s of modules
            for kind in ("_parameters", "_buffers"):
                for key, tensor in (own.get(kind) or {}).items():
                    parts += (kind, key, *(tensor_parts(tensor) if tensor is not None else ("None",)))
            parts += ("transient", *sorted(own.get("_non_persistent_buffers_set") or ()))
            self.text(*parts)
            self.add(type(module))
            for key in sorted(own.keys() - _MODULE_INTERNALS):
                attribute = own[key]
                if type(attribute) in PLAIN:  # most attributes (a width, a flag): one update
                    self.text("attribute", key, type(attribute).__name__, repr(attribute))
                elif _is_hooks(key, attribute):
                    if attribute:  # no hooks: nothing to say
                        self.text("hooks", key)
                        self.hooks(own, key, attribute)
                else:
                    self.text("attribute", key)
                    self.value(attribute)

    def hooks(self, own: dict[str, Any], key: str, hooks: dict[Any, Any]) -> None:
        """A hook dict by its hooks in order; a flag dict by the places of the hooks it flags."""
        for suffix in _HOOK_FLAGS:
            if key.endswith(suffix):
                order = list(own.get(key[: -len(suffix)]) or {})
                self.text("flags", *(order.index(h) if h in order else "?" for h in hooks))
                return
        self.text("hooks", len(hooks))
        for hook in hooks.values():
            self.value(hook)


def _is_hooks(key: str, value: Any) -> bool:
    """One of torch's hook dicts on a module (``_forward_hooks``, ``_backward_pre_hooks``…)."""
    return key.startswith("_") and "hooks" in key and is_instance(value, dict)
