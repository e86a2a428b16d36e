"""Reading intermediate features and attention weights by dotted module path, without editing the model.

A feature path is a dotted module path (``"backbone"``, ``"bert.encoder.layer.3"``), optionally followed
by selectors for modules that return several things: ``"bert.encoder[last_hidden_state]"`` (a key or
attribute of a model-output object or dict), ``"features[-1]"`` (an item of a list or tuple, as timm's
``features_only`` returns). :func:`feature_tensor` turns what was recorded into one Tensor, or says
exactly which selector to add.

Attention is read three ways, whatever the model (:func:`attention_kind`):

- ``nn.MultiheadAttention``: asked for its per-head weights by a forward pre-hook;
- timm-style ViT attention (a module with a ``qkv`` linear layer and ``num_heads``): the weights are
  recomputed from the ``qkv`` projection, so fused kernels (``F.scaled_dot_product_attention``) may stay on;
- Hugging Face attention modules (eager attention), which return ``(output, weights)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_mtkd.inputs import call_model

AttentionSource = Literal["multihead", "qkv", "returned"]

_SELECTOR = re.compile(r"\[([^\]]+)\]")


def split_feature_path(path: str) -> tuple[str, list[str]]:
    """``"a.b[x][0]"`` → ``("a.b", ["x", "0"])``: the module path and the selectors after it."""
    head, bracket, _ = path.partition("[")
    selectors = _SELECTOR.findall(path[len(head) :]) if bracket else []
    return head, selectors


def resolve_module(model: nn.Module, path: str, owner: str = "model") -> nn.Module:
    """The submodule at ``path`` (selectors ignored), with an error that lists the paths that do exist."""
    module_path, _ = split_feature_path(path)
    try:
        return model.get_submodule(module_path) if module_path else model
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        shown = ", ".join(names[:25]) + (" …" if len(names) > 25 else "")
        raise ValueError(
            f"{owner}: no submodule at feature path {module_path!r}. Paths in this model: {shown}"
        ) from None


def select(value: Any, selectors: Sequence[str]) -> Any:
    """Apply ``[key]`` / ``[index]`` selectors to a recorded module output."""
    for selector in selectors:
        if isinstance(value, (list, tuple)):
            value = value[int(selector)]
        elif isinstance(value, Mapping):
            value = value[selector]
        else:
            value = getattr(value, selector)
    return value


def feature_tensor(value: Any, path: str, owner: str = "model") -> Tensor:
    """The recorded feature as one Tensor, or a clear error naming the selector to add.

    A one-element tuple (some layers return ``(hidden,)``) is unwrapped; anything else that is not a
    Tensor is refused here, at the dry run, rather than deep inside a loss later.
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(
        f"{owner}: feature path {path!r} names a module that returns {describe_output(value)}, not one Tensor. "
        f"Pick one part with a selector, e.g. {_suggest(value, path)}, or name a submodule that returns a Tensor."
    )


def describe_output(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):  # dicts and Hugging Face ModelOutput objects
        keys = [k for k, v in value.items() if v is not None]
        return f"a {type(value).__name__} with {keys}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(describe_output(v) for v in value[:4])})"
    return f"a {type(value).__name__}"


def _suggest(value: Any, path: str) -> str:
    if isinstance(value, Mapping):
        key = next((k for k, v in value.items() if isinstance(v, Tensor)), "<key>")
        return f"{path!r} → '{path}[{key}]'"
    if isinstance(value, (list, tuple)):
        return f"'{path}[0]' or '{path}[-1]'"
    return f"'{path}[<attribute>]'"


def attention_kind(module: nn.Module) -> AttentionSource | None:
    """How attention weights can be read from ``module``, or ``None`` if it is not an attention layer."""
    if isinstance(module, nn.MultiheadAttention):
        return "multihead"
    if isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "num_heads", None), int):
        return "qkv"
    name = type(module).__name__
    if name.endswith("Attention") and type(module).__module__.startswith("transformers."):
        return "returned"
    return None


class FeatureTap:
    """Forward hooks that record what named submodules produce on every forward pass.

    ``paths`` are recorded as the module returns them (selectors applied); ``attention_paths`` as
    per-head attention probabilities ``(B, heads, queries, keys)`` (see the module docstring).
    Registered once; each forward overwrites the entries.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> tap = FeatureTap(net, ["0"])
        >>> _ = net(torch.zeros(5, 3))
        >>> tuple(tap.features["0"].shape)
        (5, 4)
    """

    def __init__(
        self, model: nn.Module, paths: Sequence[str], owner: str = "model", attention_paths: Sequence[str] = ()
    ) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.attention_paths = list(dict.fromkeys(attention_paths))
        self.features: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = []
        for path in self.paths:
            module = resolve_module(model, path, owner)
            _, selectors = split_feature_path(path)
            self._handles.append(module.register_forward_hook(_Recorder(self.features, path, selectors)))
        for path in self.attention_paths:
            self._handles.extend(_tap_attention(resolve_module(model, path, owner), self.features, path, owner))

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

    def __init__(self, store: dict[str, Any], path: str, selectors: Sequence[str] = ()) -> None:
        self.store = store
        self.path = path
        self.selectors = list(selectors)

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.store[self.path] = select(output, self.selectors) if self.selectors else output


class _ReturnedWeights:
    """Records the weights a Hugging Face attention module returns as the second item of its output."""

    def __init__(self, store: dict[str, Any], path: str, owner: str) -> None:
        self.store, self.path, self.owner = store, path, owner

    def __call__(self, module: nn.Module, _inputs: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(weights, Tensor) or weights.dim() != 4:
            raise RuntimeError(
                f"{self.owner}: attention layer {self.path!r} ({type(module).__name__}) returned no attention weights "
                f"(got {describe_output(output)}): fused kernels (SDPA, flash attention) never compute them. Load the "
                "model with eager attention, e.g. `AutoModel.from_pretrained(..., attn_implementation='eager')`, "
                "`config = BertConfig(..., attn_implementation='eager')` or `model.set_attn_implementation('eager')`."
            )
        self.store[self.path] = weights


class _MultiheadWeights:
    """Records ``nn.MultiheadAttention``'s per-head weights, which :func:`request_attention_weights` asks for."""

    def __init__(self, store: dict[str, Any], path: str, owner: str) -> None:
        self.store, self.path, self.owner = store, path, owner

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) == 2 else None
        if not isinstance(weights, Tensor) or weights.dim() != 4:
            raise RuntimeError(
                f"{self.owner}: attention layer {self.path!r} yielded no per-head attention weights; call it batched "
                "(batch_first or (L, B, E) inputs) and not through a fused kernel that bypasses "
                "nn.MultiheadAttention.forward."
            )
        self.store[self.path] = weights


class _QKVWeights:
    """Recomputes a timm-style attention's probabilities from its ``qkv`` projection ``(B, N, 3·C)``.

    ``softmax(q kᵀ · scale)`` per head, with the module's ``q_norm``/``k_norm`` if it has them — what
    timm's ``Attention.forward`` computes, fused kernel or not.
    """

    def __init__(self, store: dict[str, Any], path: str, attention: nn.Module) -> None:
        self.store, self.path = store, path
        self.heads = int(attention.num_heads)  # type: ignore[arg-type]
        self.scale = getattr(attention, "scale", None)
        # Read at call time: norms are looked up on the live module (pickles along with the model for ddp_spawn).
        self.attention_ref = attention

    def __call__(self, _module: nn.Module, _inputs: Any, qkv: Tensor) -> None:
        batch, tokens, width = qkv.shape
        head_dim = width // (3 * self.heads)
        q, k, _ = qkv.reshape(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q_norm, k_norm = getattr(self.attention_ref, "q_norm", None), getattr(self.attention_ref, "k_norm", None)
        q = q_norm(q) if isinstance(q_norm, nn.Module) else q
        k = k_norm(k) if isinstance(k_norm, nn.Module) else k
        scale = self.scale if self.scale is not None else head_dim**-0.5
        self.store[self.path] = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)


def _tap_attention(module: nn.Module, store: dict[str, Any], path: str, owner: str) -> list[RemovableHandle]:
    kind = attention_kind(module)
    if kind == "multihead":
        request_attention_weights(module)
        return [module.register_forward_hook(_MultiheadWeights(store, path, owner))]
    if kind == "qkv":
        return [module.qkv.register_forward_hook(_QKVWeights(store, path, module))]  # type: ignore[union-attr]
    if kind == "returned":
        return [module.register_forward_hook(_ReturnedWeights(store, path, owner))]
    raise TypeError(
        f"{owner}: {path!r} ({type(module).__name__}) is not an attention layer this library can read: use an "
        "nn.MultiheadAttention, a timm-style attention (a `qkv` nn.Linear and `num_heads`), or a Hugging Face "
        "attention module (eager attention)."
    )


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


# ---------------------------------------------------------------------------------- the shared feature, found
def find_shared_feature(model: nn.Module, example: Any, unpack: bool = True, owner: str = "model") -> str:
    """The path of the module whose output feeds every task head: the model's shared representation.

    Found from one forward pass on ``example`` with a hook on every submodule: each task output is
    traced back to the module that produced it (its head), and the heads' common input to the
    outermost module that returned it (``"backbone"`` in a :class:`MultiTaskNet`, the pooler or the
    last dropout in a Hugging Face model with task heads). When the model computes that input itself
    (a timm-style net pools ``forward_features`` in ``forward``), the last submodule to run before the
    heads is taken: its output is what was pooled (``norm``: the token features). Raises if the heads
    read different inputs.
    """
    records: list[tuple[str, Any, Any]] = []
    handles = [
        module.register_forward_hook(lambda _m, args, out, name=name: records.append((name, args, out)))
        for name, module in model.named_modules()
        if name
    ]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            output = call_model(model, example, unpack)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    outputs = output if isinstance(output, Mapping) else {"output": output}
    head_inputs = []
    for task, value in outputs.items():
        if not isinstance(value, Tensor):
            continue
        head = _last_producer(records, value)
        if head is None or not head[1] or not isinstance(head[1][0], Tensor):
            raise ValueError(
                f"{owner}: cannot find the shared feature automatically: the output {task!r} comes from no "
                "submodule taking a Tensor input. Give the feature path explicitly (e.g. `student_feature`, "
                "`teacher_feature`)."
            )
        head_inputs.append((task, head[0], head[1][0], head[2]))
    first = head_inputs[0][2]
    different = [(task, head) for task, head, tensor, _ in head_inputs if not _same_tensor(tensor, first)]
    if different:
        heads = {task: head for task, head, _, _ in head_inputs}
        raise ValueError(
            f"{owner}: cannot find one shared feature automatically: the task heads {heads} read different inputs. "
            "Give the feature path explicitly (e.g. `student_feature`, `teacher_feature`), or turn the feature "
            "term off."
        )
    producers = [name for name, _, out in records if isinstance(out, Tensor) and _same_tensor(out, first)]
    if producers:
        return min(producers, key=lambda name: name.count("."))  # the outermost module that returned it
    # Computed in forward itself (pooling): the last module to finish before the first head started.
    head_names = {head for _, head, _, _ in head_inputs}
    before = [
        (name, out)
        for name, _, out in records[: min(index for *_, index in head_inputs)]
        if isinstance(out, Tensor) and out.dim() >= 2 and out.shape[0] == first.shape[0]
        and not any(name == h or name.startswith(f"{h}.") for h in head_names)
    ]
    if not before:
        raise ValueError(
            f"{owner}: the task heads read a tensor that no submodule returns (it is computed in forward itself). "
            "Give the feature path explicitly (e.g. `student_feature`, `teacher_feature`)."
        )
    last = before[-1][1]
    outermost = [name for name, out in before if out is last]
    return min(outermost, key=lambda name: name.count("."))


def _last_producer(records: list[tuple[str, Any, Any]], value: Tensor) -> tuple[str, Any, int] | None:
    """The head that produced ``value`` (or a tensor it is a view of): the outermost module that returned it,
    with the position of its first sub-module in ``records`` (where the head started).

    A head may be nested (``nn.Sequential(Linear, ReLU, Linear)``): its last layer returns the same
    tensor, but only the outermost one reads the shared feature.
    """
    matches = [(name, args) for name, args, out in records if isinstance(out, Tensor) and _shares_storage(out, value)]
    if not matches:
        return None
    name, args = min(matches, key=lambda match: match[0].count("."))
    start = next(i for i, (other, _, _) in enumerate(records) if other == name or other.startswith(f"{name}."))
    return name, args, start


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and _shares_storage(a, b)


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
