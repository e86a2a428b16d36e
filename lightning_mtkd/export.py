"""Export the student alone — no teacher, adaptors or other training-only parts — to ONNX or TorchScript.

    lightning-mtkd export --ckpt_path checkpoints/multimnist/shared.ckpt --format onnx \\
        --output student.onnx --input_shape=[1,36,36]
    lightning-mtkd export --ckpt_path bert.ckpt --format onnx --output student.onnx \\
        --input_shape='{input_ids: [64], attention_mask: [64]}' --input_dtype=int64

The exported graph takes ``input`` (or, for a model called with keyword inputs such as a Hugging Face
transformer, one named input per key) with a dynamic batch axis, and has one named output per task
(ONNX output names; a TorchScript module returns ``{task: Tensor}``). Teachers are never in a
student's checkpoint in the first place (see ``DistillationModule``); adaptors are, and are left
out because only the student network (``--student``, default ``model``) is exported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_mtkd.inputs import call_model

ExportFormat = Literal["onnx", "torchscript"]
#: One sample's input shape (without the batch axis), or one per keyword input.
InputShape = list[int] | dict[str, list[int]]
InputDtype = str | dict[str, str]


class NamedOutputs(nn.Module):
    """Wraps a network so its inputs go in as positional tensors and its outputs come out in a fixed task order.

    Exporters need both: ``input_names`` name the positional inputs (passed to the network as keyword
    arguments when ``input_keys`` is given, as Hugging Face models take them), ``names`` the outputs.

    Args:
        network: The student (or one of its submodules).
        names: Output names in order: the keys of the dict it returns, or one name for a bare Tensor.
        as_dict: Return ``{name: Tensor}`` instead of a tuple (TorchScript keeps the names that way).
        input_keys: Keyword names of the inputs, in order (``None``: one positional input).
    """

    def __init__(
        self, network: nn.Module, names: Sequence[str], as_dict: bool = False, input_keys: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.network = network
        self.names = list(names)
        self.as_dict = as_dict
        self.input_keys = list(input_keys) if input_keys is not None else None

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...] | dict[str, Tensor]:
        if self.input_keys is not None:
            output = self.network(**dict(zip(self.input_keys, inputs, strict=True)))
        else:
            output = self.network(*inputs)
        values = (output,) if isinstance(output, Tensor) else tuple(output[name] for name in self.names)
        return dict(zip(self.names, values, strict=True)) if self.as_dict else values


def load_student(ckpt_path: str, student: str = "model", model: nn.Module | None = None) -> nn.Module:
    """The student network (or the submodule at dotted path ``student``) of a lightning-mtkd checkpoint, on CPU.

    The checkpoint is loaded with ``weights_only=True``; teachers are not loaded (they are never needed).
    ``model``: the network, built by you, to load the weights into — for a checkpoint that could not record
    how to rebuild its network (the error says so).
    """
    from lightning_mtkd.checkpoints import load_module

    module = load_module(ckpt_path, role="export", network=model)
    try:
        network = module.get_submodule(student)
    except AttributeError as error:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"export: the module has no submodule {student!r} ({error}). Give --student the dotted path of the student "
            f"network inside the LightningModule; its children are {children}."
        ) from None
    return network.eval()


def example_inputs(input_shape: InputShape, input_dtype: InputDtype = "float32", batch: int = 2) -> Any:
    """A batch of example inputs: zeros for floating inputs, ones for integer ones (valid token ids and masks)."""

    def one(shape: Sequence[int], dtype_name: str) -> Tensor:
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"export: unknown input dtype {dtype_name!r}; use e.g. float32 or int64.")
        if not shape or any(size < 1 for size in shape):
            raise ValueError(
                f"export: input_shape must be one sample's shape without the batch axis, e.g. --input_shape=[1,36,36] "
                f"or '{{input_ids: [64], attention_mask: [64]}}'; got {list(shape)}."
            )
        fill = torch.zeros if dtype.is_floating_point else torch.ones
        return fill(batch, *shape, dtype=dtype)

    if isinstance(input_shape, Mapping):
        dtypes = input_dtype if isinstance(input_dtype, Mapping) else dict.fromkeys(input_shape, input_dtype)
        missing = [key for key in input_shape if key not in dtypes]
        if missing:
            raise ValueError(f"export: input_dtype names no dtype for input(s) {missing}.")
        return {key: one(shape, dtypes[key]) for key, shape in input_shape.items()}
    if isinstance(input_dtype, Mapping):
        raise ValueError("export: a dict of input dtypes needs a dict of input shapes (one per keyword input).")
    return one(input_shape, input_dtype)


def output_names(network: nn.Module, example: Any, default: str = "output") -> list[str]:
    """The task names a network outputs (dict keys in order), or ``[default]`` for a bare Tensor."""
    with torch.inference_mode():
        output = call_model(network, example)
    if isinstance(output, Tensor):
        return [default]
    if not isinstance(output, Mapping) or not all(isinstance(v, Tensor) for v in output.values()):
        raise TypeError(
            f"export: the network returns {type(output).__name__}; it must return a Tensor or dict[task, Tensor]."
        )
    return list(output)


def export_module(
    network: nn.Module,
    output: str,
    input_shape: InputShape,
    format: ExportFormat = "onnx",
    default_name: str = "output",
    input_dtype: InputDtype = "float32",
) -> list[str]:
    """Export ``network`` for inputs of shape ``(batch, *input_shape)`` with a dynamic batch axis.

    Returns the output names (one per task). ONNX goes through ``torch.onnx.export`` (the
    ``torch.export``-based exporter); TorchScript through ``torch.jit.trace`` (a shape-agnostic
    graph for the plain conv/MLP students here; a model with data-dependent control flow would need
    ``torch.jit.script``). A dict ``input_shape`` exports one named input per key, passed to the network
    as keyword arguments.
    """
    network = network.eval()
    device = next(network.parameters(), torch.zeros(())).device
    # Batch 2, not 1: exporters specialise a size-1 dimension to a constant.
    example = example_inputs(input_shape, input_dtype)
    example = {k: v.to(device) for k, v in example.items()} if isinstance(example, dict) else example.to(device)
    names = output_names(network, example, default_name)
    keys = list(example) if isinstance(example, dict) else None
    inputs = tuple(example.values()) if isinstance(example, dict) else (example,)
    input_names = keys or ["input"]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if format == "onnx":
        batch = torch.export.Dim("batch")
        torch.onnx.export(
            NamedOutputs(network, names, input_keys=keys),
            inputs,
            output,
            input_names=input_names,
            output_names=names,
            dynamic_shapes=(tuple({0: batch} for _ in inputs),),  # one entry: the *inputs of NamedOutputs.forward
            dynamo=True,
            external_data=False,  # one self-contained file
            verbose=False,
        )
    elif format == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(NamedOutputs(network, names, as_dict=True, input_keys=keys), inputs, strict=False)
        traced.save(output)
    else:  # a Python caller bypassing the Literal
        raise ValueError(f"export: unknown format {format!r}; use 'onnx' or 'torchscript'.")
    return names


def export_checkpoint(
    ckpt_path: str,
    output: str,
    input_shape: InputShape,
    format: ExportFormat = "onnx",
    student: str = "model",
    input_dtype: InputDtype = "float32",
    model: nn.Module | None = None,
) -> list[str]:
    """Export the student of a checkpoint alone (``lightning-mtkd export``).

    Args:
        ckpt_path: A checkpoint written by a lightning-mtkd module.
        output: The file to write (``.onnx`` or ``.pt``).
        input_shape: One sample's input shape, without the batch axis (``[1, 36, 36]`` for MultiMNIST), or one
            per keyword input (``{input_ids: [64], attention_mask: [64]}`` for a Hugging Face model).
        format: ``onnx`` or ``torchscript``.
        student: Dotted path of the network to export inside the LightningModule: ``model`` (the
            student) by default; a per-task student of a transfer strategy by its path (its outputs
            are named after the last path component when it returns a bare Tensor).
        input_dtype: The inputs' dtype (``int64`` for token ids), or one per keyword input.
        model: The student network built by you (``--model.class_path ... --model.init_args...``), for a
            checkpoint that could not record how to rebuild it; its weights come from the checkpoint.
    """
    network = load_student(ckpt_path, student, model)
    return export_module(network, output, input_shape, format, student.rsplit(".", 1)[-1], input_dtype)


def main(args: Sequence[str] | None = None) -> list[str]:
    """``lightning-mtkd export ...``: parse the options of :func:`export_checkpoint` and run it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lightning-mtkd export", description=(export_checkpoint.__doc__ or "").splitlines()[0])
    parser.add_function_arguments(export_checkpoint, as_group=False)
    config = parser.parse_args(list(args) if args is not None else None)
    options = parser.instantiate_classes(config)
    names = export_checkpoint(**{k: v for k, v in options.items() if k != "config"})
    print(f"exported {config.output} ({config.format}); outputs {names}")
    return names
