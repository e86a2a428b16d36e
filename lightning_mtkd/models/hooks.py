"""Reading intermediate features by dotted module path, without editing the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


def resolve_module(model: nn.Module, path: str, owner: str = "model") -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists the paths that do exist."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        shown = ", ".join(names[:25]) + (" …" if len(names) > 25 else "")
        raise ValueError(f"{owner}: no submodule at feature path {path!r}. Paths in this model: {shown}") from None


class FeatureTap:
    """Forward hooks that record the outputs of named submodules on every forward pass.

    Registered once; each forward overwrites ``features[path]``. A module returning a tuple (such as
    ``nn.MultiheadAttention``) is recorded as the tuple.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> tap = FeatureTap(net, ["0"])
        >>> _ = net(torch.zeros(5, 3))
        >>> tuple(tap.features["0"].shape)
        (5, 4)
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], owner: str = "model") -> None:
        self.paths = list(dict.fromkeys(paths))
        self.features: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = []
        for path in self.paths:
            module = resolve_module(model, path, owner)
            self._handles.append(module.register_forward_hook(_Recorder(self.features, path)))

    def pop(self) -> dict[str, Any]:
        """The features of the last forward pass; the tap is emptied so no tensor outlives its step."""
        features = dict(self.features)
        self.features.clear()  # the hooks hold this very dict
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _Recorder:
    """The hook itself: a picklable object (not a closure), so a tapped model survives ``ddp_spawn``."""

    def __init__(self, store: dict[str, Any], path: str) -> None:
        self.store = store
        self.path = path

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.store[self.path] = output


def request_attention_weights(module: nn.Module) -> None:
    """Make an ``nn.MultiheadAttention`` return its per-head attention probabilities, for a :class:`FeatureTap`.

    Callers such as ``nn.TransformerEncoderLayer`` ask for ``need_weights=False``; a forward pre-hook
    turns on ``need_weights`` and turns off ``average_attn_weights`` instead, so the module returns
    ``(output, weights (B, heads, queries, keys))``. The output is the same attention computed
    without the fused kernel (equal to float rounding; the tests check it). Any hook on a
    submodule also keeps ``nn.TransformerEncoderLayer`` off its fused inference path, which would
    skip the attention module altogether. Idempotent.
    """
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"attention weights can only be read from nn.MultiheadAttention, not {type(module).__name__}.")
    if getattr(module, "_mtkd_weights_requested", False):
        return

    module.register_forward_pre_hook(_want_attention_weights, with_kwargs=True)
    module._mtkd_weights_requested = True  # type: ignore[assignment]


def _want_attention_weights(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # A module-level function, not a closure, so the hooked model pickles (ddp_spawn).
    # forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
    arguments = list(args)
    for index, name, value in ((4, "need_weights", True), (6, "average_attn_weights", False)):
        if len(arguments) > index:
            arguments[index] = value
        else:
            kwargs[name] = value
    return tuple(arguments), kwargs
