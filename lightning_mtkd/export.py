"""Export the student alone — no teacher, adaptors or other training-only parts — to ONNX or TorchScript.

    lightning-mtkd export --ckpt_path checkpoints/multimnist/shared.ckpt --format onnx \\
        --output student.onnx --input_shape=[1,36,36]

The exported graph takes ``input`` with a dynamic batch axis and has one named output per task
(ONNX output names; a TorchScript module returns ``{task: Tensor}``). Teachers are never in a
student's checkpoint in the first place (see ``DistillationModule``); adaptors are, and are left
out because only the student network (``--student``, default ``model``) is exported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

ExportFormat = Literal["onnx", "torchscript"]


class NamedOutputs(nn.Module):
    """Wraps a network so its outputs come out as a tuple in a fixed task order (exporters need one).

    Args:
        network: The student (or one of its submodules).
        names: Output names in order: the keys of the dict it returns, or one name for a bare Tensor.
        as_dict: Return ``{name: Tensor}`` instead of a tuple (TorchScript keeps the names that way).
    """

    def __init__(self, network: nn.Module, names: Sequence[str], as_dict: bool = False) -> None:
        super().__init__()
        self.network = network
        self.names = list(names)
        self.as_dict = as_dict

    def forward(self, x: Tensor) -> tuple[Tensor, ...] | dict[str, Tensor]:
        output = self.network(x)
        values = (output,) if isinstance(output, Tensor) else tuple(output[name] for name in self.names)
        return dict(zip(self.names, values, strict=True)) if self.as_dict else values


def load_student(ckpt_path: str, student: str = "model") -> nn.Module:
    """The student network (or the submodule at dotted path ``student``) of a lightning-mtkd checkpoint, on CPU.

    The checkpoint is loaded with ``weights_only=True``; teachers are not loaded (they are never needed).
    """
    from lightning_mtkd.strategies.base import load_module

    module = load_module(ckpt_path, role="export")
    try:
        network = module.get_submodule(student)
    except AttributeError as error:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"export: the module has no submodule {student!r} ({error}). Give --student the dotted path of the student "
            f"network inside the LightningModule; its children are {children}."
        ) from None
    return network.eval()


def output_names(network: nn.Module, example: Tensor, default: str = "output") -> list[str]:
    """The task names a network outputs (dict keys in order), or ``[default]`` for a bare Tensor."""
    with torch.inference_mode():
        output = network(example)
    if isinstance(output, Tensor):
        return [default]
    if not isinstance(output, dict) or not all(isinstance(v, Tensor) for v in output.values()):
        raise TypeError(
            f"export: the network returns {type(output).__name__}; it must return a Tensor or dict[task, Tensor]."
        )
    return list(output)


def export_module(
    network: nn.Module,
    output: str,
    input_shape: Sequence[int],
    format: ExportFormat = "onnx",
    default_name: str = "output",
) -> list[str]:
    """Export ``network`` for inputs of shape ``(batch, *input_shape)`` with a dynamic batch axis.

    Returns the output names (one per task). ONNX goes through ``torch.onnx.export`` (the
    ``torch.export``-based exporter); TorchScript through ``torch.jit.trace`` (a shape-agnostic
    graph for the plain conv/MLP students here; a model with data-dependent control flow would need
    ``torch.jit.script``).
    """
    network = network.eval()
    # Batch 2, not 1: exporters specialise a size-1 dimension to a constant.
    example = torch.zeros(2, *input_shape, device=next(network.parameters(), torch.zeros(())).device)
    names = output_names(network, example, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if format == "onnx":
        batch = torch.export.Dim("batch")
        torch.onnx.export(
            NamedOutputs(network, names),
            (example,),
            output,
            input_names=["input"],
            output_names=names,
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,  # one self-contained file
            verbose=False,
        )
    elif format == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(NamedOutputs(network, names, as_dict=True), example, strict=False)
        traced.save(output)
    else:  # a Python caller bypassing the Literal
        raise ValueError(f"export: unknown format {format!r}; use 'onnx' or 'torchscript'.")
    return names


def export_checkpoint(
    ckpt_path: str,
    output: str,
    input_shape: list[int],
    format: ExportFormat = "onnx",
    student: str = "model",
) -> list[str]:
    """Export the student of a checkpoint alone (``lightning-mtkd export``).

    Args:
        ckpt_path: A checkpoint written by a lightning-mtkd module.
        output: The file to write (``.onnx`` or ``.pt``).
        input_shape: One sample's input shape, without the batch axis (``[1, 36, 36]`` for MultiMNIST).
        format: ``onnx`` or ``torchscript``.
        student: Dotted path of the network to export inside the LightningModule: ``model`` (the
            student) by default; a per-task student of a transfer strategy by its path (its outputs
            are named after the last path component when it returns a bare Tensor).
    """
    if not input_shape or any(size < 1 for size in input_shape):
        raise ValueError(
            f"export: input_shape must be one sample's shape without the batch axis, e.g. --input_shape=[1,36,36]; "
            f"got {input_shape}."
        )
    network = load_student(ckpt_path, student)
    return export_module(network, output, input_shape, format, default_name=student.rsplit(".", 1)[-1])


def main(args: Sequence[str] | None = None) -> list[str]:
    """``lightning-mtkd export ...``: parse the options of :func:`export_checkpoint` and run it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lightning-mtkd export", description=(export_checkpoint.__doc__ or "").splitlines()[0])
    parser.add_function_arguments(export_checkpoint, as_group=False)
    config = parser.parse_args(list(args) if args is not None else None)
    names = export_checkpoint(**{k: v for k, v in config.items() if k != "config"})
    print(f"exported {config.output} ({config.format}); input 'input' (dynamic batch), outputs {names}")
    return names
