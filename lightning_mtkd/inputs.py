"""Model inputs as pytrees: a Tensor, a dict of Tensors (Hugging Face ``input_ids``/``attention_mask``), or a tuple.

The shared step, the dry run that sizes adaptors, the teacher cache, export and the report all go
through these few functions, so none of them assumes one input Tensor. A dict is passed to the model
as keyword arguments and a tuple or list as positional arguments (``unpack_inputs=False`` on a module
passes the input as one argument instead).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn


def call_model(model: nn.Module, inputs: Any, unpack: bool = True) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple or list, ``model(inputs)`` otherwise."""
    if unpack and isinstance(inputs, Mapping):
        return model(**inputs)
    if unpack and isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def tensor_leaves(inputs: Any) -> list[Tensor]:
    """Every Tensor in ``inputs`` (dict values in key order, sequence items in order)."""
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [leaf for value in inputs.values() for leaf in tensor_leaves(value)]
    if isinstance(inputs, (tuple, list)):
        return [leaf for value in inputs for leaf in tensor_leaves(value)]
    return []


def batch_size(batch: Mapping[str, Any]) -> int:
    """Samples in a batch: the length of ``batch["index"]``, else the first dimension of its first input tensor."""
    index = batch.get("index")
    if isinstance(index, Tensor) and index.dim() == 1:
        return index.shape[0]
    leaves = tensor_leaves(batch.get("input"))
    if not leaves or leaves[0].dim() == 0:
        raise ValueError(
            "cannot tell the batch size: the batch has no 'index' tensor and its 'input' holds no batched tensor. "
            "Return 'index' (each sample's position in its dataset) from your dataset."
        )
    return leaves[0].shape[0]


def first_samples(inputs: Any, count: int) -> Any:
    """The first ``count`` samples of every tensor in ``inputs`` (a dry-run example)."""
    return apply_to_collection(inputs, Tensor, lambda tensor: tensor[:count])


def to_device(inputs: Any, device: torch.device | str) -> Any:
    return apply_to_collection(inputs, Tensor, lambda tensor: tensor.to(device))


def padding_mask(inputs: Any) -> Tensor | None:
    """``inputs["attention_mask"]`` as booleans ``(B, L)`` (true on real tokens), or ``None`` without one."""
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), Tensor):
        mask = inputs["attention_mask"]
        return mask.bool() if mask.dim() == 2 else None
    return None


def check_keywords(model: nn.Module, inputs: Any, who: str) -> None:
    """Raise a clear error if a dict input has keys the model's ``forward`` does not take.

    Only checked when ``forward`` has no ``**kwargs`` (which would accept anything).
    """
    if not isinstance(inputs, Mapping):
        return
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a builtin or C++ forward: nothing to check against
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [key for key in inputs if key not in parameters]
    if unknown:
        raise TypeError(
            f"{who} ({type(model).__name__}) takes no input(s) {unknown}: its forward takes {list(parameters)}, and "
            f"the batch's 'input' dict has keys {list(inputs)}. Drop the extra keys in your dataset or collate "
            "function, or set `unpack_inputs=False` to pass the dict as one argument."
        )


def describe(inputs: Any) -> str:
    """A short description of a pytree of tensors, for error messages."""
    if isinstance(inputs, Tensor):
        return f"Tensor{tuple(inputs.shape)}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return "(" + ", ".join(describe(v) for v in inputs) + ")"
    return type(inputs).__name__
