"""Trainable modules whose shapes come from a dry run: adaptors and learned fusion gates.

A strategy cannot size an adaptor before it has seen a student and a teacher feature, so these
modules are built at ``setup`` from one dry run. A checkpoint holds their tensors but no dry run,
so :class:`DeferredModules` rebuilds any entry it does not have yet from the tensors themselves,
just before the state dict is loaded into it (``load_from_checkpoint``, resuming, and the non-strict
load through which ``ddp_spawn`` hands the trained weights back to the main process).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from torch import Tensor, nn

from lightning_mtkd.config import class_path


class Rebuildable(Protocol):
    """A module that can be rebuilt, with the right shapes, from its own tensors in a state dict."""

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str) -> nn.Module: ...


class DeferredModules(nn.ModuleDict):
    """A ``ModuleDict`` of dry-run-sized modules that rebuilds missing entries from a state dict.

    Each entry's class is recorded (``get_extra_state``) so entries of different classes can live
    side by side; a state dict without that record (written before it existed) rebuilds every entry
    as ``default``.

    Example:
        >>> import torch
        >>> from lightning_mtkd.models import Adaptor
        >>> built = DeferredModules(Adaptor)
        >>> built["hint"] = Adaptor.between((2, 8), (2, 32))
        >>> fresh = DeferredModules(Adaptor)
        >>> _ = fresh.load_state_dict(built.state_dict())
        >>> tuple(fresh["hint"](torch.zeros(2, 8)).shape)
        (2, 32)
    """

    def __init__(self, default: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.default = default

    def get_extra_state(self) -> dict[str, str]:
        return {name: class_path(module) for name, module in self.items()}

    def set_extra_state(self, state: Any) -> None:
        """The classes were used when the entries were rebuilt (in ``_load_from_state_dict``)."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Called before the children are loaded, so entries built here receive their tensors right after.
        # A state dict written before the classes were recorded has no extra state: rebuild as `default`.
        recorded = state_dict.setdefault(f"{prefix}_extra_state", {}) or {}
        names = {key[len(prefix) :].split(".", 1)[0] for key in state_dict if key.startswith(prefix)}
        for name in sorted(names - {"_extra_state"} - set(self.keys())):
            cls = _import(recorded[name]) if name in recorded else self.default
            if cls is None:
                raise KeyError(f"cannot rebuild {prefix}{name}: the state dict does not record its class.")
            self[name] = cls.from_state(state_dict, f"{prefix}{name}.")  # type: ignore[attr-defined]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _import(path: str) -> type[nn.Module]:
    module_path, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_path), name)


class FusionGate(nn.Linear):
    """A linear gate over the teachers' concatenated outputs, one logit per teacher, starting as the plain mean.

    Zero weights and bias: softmax of zeros is the uniform mixture, from which the gate learns to depart.
    """

    def __init__(self, in_features: int, teachers: int) -> None:
        super().__init__(in_features, teachers)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str) -> FusionGate:
        weight = state[f"{prefix}weight"]
        return cls(weight.shape[1], weight.shape[0]).to(weight.device)
