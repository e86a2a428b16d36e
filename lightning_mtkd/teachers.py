"""The frozen teachers of a distillation module, in one object.

:class:`Teachers` holds every teacher by name, from a module or a checkpoint path, and keeps the
rules of teacher hygiene in one place: loaded on first use, frozen (``requires_grad=False``), in
eval mode whatever ``train()`` the module is put in, moved along with the module, run under
``torch.inference_mode()``, and never part of the module tree — so never in ``state_dict()``,
``parameters()``, the optimizer or DDP's gradient sync. A student evaluated without its teachers
(a checkpoint whose teacher file has moved) simply has ``active`` false.

Big teachers:

* ``precision="bf16"`` or ``"16"`` casts a teacher's floating-point weights and buffers once, when it is
  loaded, and runs it in that dtype (floating inputs cast to it, autocast off inside the teacher);
  its outputs and tapped features come back as float32. Half the teacher's memory and, on hardware
  with fast bf16/fp16 kernels, much of its time. Outputs differ from float32 by the dtype's rounding:
  about 1e-2 relative for bf16 (8 bits of mantissa), 1e-3 for fp16 (``tests/test_teacher_precision.py``
  checks both). On CPU most layers have fp16 kernels (torch ≥ 2.1) but some ops do not (``cdist``,
  ``linalg.*``, FFTs): such a teacher fails on its first forward with an error that names the
  option; use ``"bf16"`` or ``"32"`` there.
* ``device="cpu"`` (or ``"cuda:1"``) keeps a teacher on its own device whatever the student's: inputs go
  to it and outputs come back to the student's device (the device of the inputs). A teacher too big
  for the GPU can run on the CPU, at CPU speed — with the teacher cache (``lightning-mtkd cache``)
  it runs once per sample, not once per sample and epoch.
* Under DDP every process holds a full copy of each teacher on its device: ``world_size × teacher
  parameters × bytes per parameter`` (a 1B-parameter teacher: 4 GB per process in fp32, 2 GB in
  bf16), plus its activations for one batch. See ``benchmarks/results/teachers.md`` for what
  sharding with FSDP would take.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_mtkd.inputs import call_model, tensor_leaves
from lightning_mtkd.models.hooks import FeatureTap

#: The name under which a single teacher is kept.
TEACHER = "teacher"

#: What a student's checkpoint records for a teacher that was given as a module (its weights are never saved).
UNSAVED_TEACHER = "<teacher given as a module: not saved>"

TeacherSource = nn.Module | str | None
TeacherPrecision = Literal["32", "bf16", "16"]
_DTYPES: dict[str, torch.dtype] = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


class Teachers:
    """Every teacher of a module, by name, with the taps that read their features.

    Args:
        teacher: A module, a path to a lightning-mtkd checkpoint, or ``{name: module or path}``; a single
            teacher is named :data:`TEACHER`.
        loader: Reads a checkpoint path into the teacher network (see
            :func:`lightning_mtkd.checkpoints.load_teacher`).
        precision: ``"32"`` (the weights as given; the forward follows the trainer's precision, autocast
            included), ``"bf16"`` or ``"16"``: weights cast once, forward in that dtype, outputs as float32.
        device: Where the teachers run (``"cpu"``, ``"cuda:1"``); ``None`` moves them with the module.

    Example:
        >>> teachers = Teachers(nn.Linear(4, 2), loader=None, precision="bf16")
        >>> teachers["teacher"].weight.dtype
        torch.bfloat16
        >>> out, _ = teachers.run(torch.ones(3, 4))["teacher"]
        >>> out.dtype, out.shape
        (torch.float32, torch.Size([3, 2]))
    """

    def __init__(
        self,
        teacher: TeacherSource | Mapping[str, TeacherSource],
        loader: Callable[[str, str], nn.Module] | None,
        precision: TeacherPrecision = "32",
        device: str | torch.device | None = None,
    ):
        if precision not in _DTYPES:
            raise ValueError(f"teacher_precision must be one of {list(_DTYPES)} ('16' is float16), got {precision!r}.")
        sources = dict(teacher) if isinstance(teacher, Mapping) else {TEACHER: teacher}
        for name, source in sources.items():
            if isinstance(source, str) and not source:
                raise ValueError(f"teacher {name!r}: empty checkpoint path.")
        self.sources: dict[str, TeacherSource] = sources
        self._load = loader
        self._modules: dict[str, nn.Module] = {}
        self._taps: dict[str, FeatureTap] = {}
        #: False while a student is evaluated alone (its teachers are not available); set at each setup.
        self.active = True
        self._move: list[Callable[[nn.Module], Any]] = []
        self.precision: TeacherPrecision = precision
        self.dtype = _DTYPES[precision]
        self.device = torch.device(device) if device is not None else None

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    def __getitem__(self, name: str) -> nn.Module:
        """The teacher ``name``, loaded (from its checkpoint path) and frozen on first use."""
        if name not in self._modules:
            if name not in self.sources:
                raise KeyError(f"no teacher {name!r}; the teachers are {self.names}.")
            self._modules[name] = self._prepare(name, self.sources[name])
        return self._modules[name]

    def modules(self) -> dict[str, nn.Module]:
        """Every teacher, loaded."""
        return {name: self[name] for name in self.sources}

    def _prepare(self, name: str, source: TeacherSource) -> nn.Module:
        if source is None or source == UNSAVED_TEACHER:
            raise RuntimeError(
                f"teacher {name!r} is not available: this module was loaded from a checkpoint of a teacher given as "
                "a module. Pass `teacher=` (a module or checkpoint path) to train or evaluate against it."
            )
        if isinstance(source, str):
            if self._load is None:
                raise RuntimeError(f"teacher {name!r} is a checkpoint path, but no loader was given.")
            module = self._load(source, name)
        else:
            module = source
        module.eval()
        module.requires_grad_(False)
        if self.device is not None:
            module.to(self.device)
        else:
            for move in self._move:  # the device and dtype moves the owning module has had since
                module._apply(move)
        self._cast(module)
        if self.pinned:  # any call (the dry runs too) gets its floating inputs in the teacher's dtype, on its device
            module.register_forward_pre_hook(_inputs_to_weights, with_kwargs=True)
        return module

    @property
    def pinned(self) -> bool:
        """Whether the teachers keep their own dtype or device rather than the module's."""
        return self.precision != "32" or self.device is not None

    def _cast(self, module: nn.Module) -> None:
        """Cast the floating-point weights and buffers to the teacher dtype: once, when loaded (and again only
        if a move of the owning module changed them, e.g. ``.double()``)."""
        if self.precision != "32":
            module.to(self.dtype)

    def missing(self) -> dict[str, str]:
        """``{name: why}`` for every teacher that cannot be loaded (a module given but not saved, a moved file)."""
        problems = {}
        for name, source in self.sources.items():
            if source is None or source == UNSAVED_TEACHER:
                problems[name] = "given as a module, not saved in the checkpoint"
            elif isinstance(source, str) and not os.path.exists(source):
                problems[name] = f"no file at {source!r}"
        return problems

    def activate(self, needed: bool) -> bool:
        """Decide whether this stage uses the teachers: always when ``needed`` (fitting; a missing one is an
        error then), else only if every teacher is there. Returns the decision."""
        missing = {} if needed else self.missing()
        if missing:
            warnings.warn(
                f"teacher(s) not available ({missing}); evaluating the student alone.",
                stacklevel=3,
            )
        self.active = not missing
        return self.active

    # ------------------------------------------------------------------------------ hygiene
    def eval(self) -> None:
        for module in self._modules.values():
            module.eval()

    def apply(self, fn: Callable[[Any], Any]) -> None:
        """Move the loaded teachers as the owning module moves (``.to()``, ``.cuda()``, ``.half()``);
        teachers loaded later get the same moves. A teacher with its own ``device`` does not move, and one with
        a lower ``precision`` keeps its dtype."""
        if self.device is not None:
            return  # a teacher on its own device stays there (and in its own dtype)
        self._move.append(fn)
        for module in self._modules.values():
            module._apply(fn)
            self._cast(module)

    # ------------------------------------------------------------------------------ forward
    def tap(self, name: str, paths: Sequence[str], attention_paths: Sequence[str] = ()) -> None:
        """Record the features at ``paths`` (and attention weights at ``attention_paths``) of teacher ``name``."""
        if name not in self._taps:
            self._taps[name] = FeatureTap(self[name], paths, owner=f"teacher {name!r}", attention_paths=attention_paths)

    def run(self, inputs: Any, unpack: bool = True) -> dict[str, tuple[Any, dict[str, Any]]]:
        """``{name: (raw output, tapped features)}`` of every teacher, computed under ``torch.inference_mode()``.

        Inference tensors cannot be saved for backward, so outputs and features are copied outside inference
        mode (cheap: logits and a few feature maps) — onto the inputs' device (the student's) and, for a teacher
        in bf16/fp16, as float32.
        """
        leaves = tensor_leaves(inputs)
        home = leaves[0].device if leaves else None
        pinned = self.pinned
        with torch.inference_mode():
            raw = {}
            for name, teacher in self.modules().items():
                if not pinned:  # the teacher lives and runs as the module does
                    raw[name] = (call_model(teacher, inputs, unpack), self._pop(name))
                    continue
                reference = _first_tensor(teacher)
                device = reference.device if reference is not None else torch.device("cpu")
                with self._own_precision(name, device):  # inputs cast by the teacher's pre-hook
                    raw[name] = (call_model(teacher, inputs, unpack), self._pop(name))
        if not pinned:
            return {name: (_clone_tree(output), _clone_tree(features)) for name, (output, features) in raw.items()}
        return {
            name: (_to_student(output, home), _to_student(features, home)) for name, (output, features) in raw.items()
        }

    @contextlib.contextmanager
    def _own_precision(self, name: str, device: torch.device) -> Any:
        """Autocast off (the teacher runs in its own dtype), and a clear error where that dtype has no kernel."""
        try:
            with torch.autocast(device.type, enabled=False):
                yield
        except (RuntimeError, NotImplementedError) as error:
            text = str(error)
            if self.precision != "32" and any(k in text for k in ("Half", "BFloat16", "Low precision", "dtype")):
                instead = "'bf16' or '32'" if self.precision == "16" else "'32'"
                raise RuntimeError(
                    f"teacher {name!r} cannot run with teacher_precision={self.precision!r} ({self.dtype}) on "
                    f"{device}: {text.splitlines()[0].rstrip('.')}. Some ops have no kernel for that dtype on this "
                    f"device (on CPU: cdist, linalg, FFTs); use teacher_precision={instead}, or run the teacher "
                    "where the kernel exists (teacher_device)."
                ) from error
            raise

    def _pop(self, name: str) -> dict[str, Any]:
        tap = self._taps.get(name)
        return tap.pop() if tap is not None else {}

    def config(self) -> Any:
        """The teachers as a checkpoint records them: paths kept; a module recorded as :data:`UNSAVED_TEACHER`.

        A module's weights must never enter the student's checkpoint, and rebuilding its architecture alone
        would give a random teacher.
        """
        recorded = {
            name: source if isinstance(source, str) else UNSAVED_TEACHER for name, source in self.sources.items()
        }
        return recorded[TEACHER] if list(recorded) == [TEACHER] else recorded


def _first_tensor(module: nn.Module) -> Tensor | None:
    parameter = next(iter(module.parameters()), None)
    return parameter if parameter is not None else next(iter(module.buffers()), None)


def _inputs_to_weights(module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """A forward pre-hook: floating-point inputs in the dtype of the module's weights, every input on their device."""
    reference = _first_tensor(module)
    if reference is None:
        return args, kwargs

    def convert(t: Tensor) -> Tensor:
        return t.to(device=reference.device, dtype=reference.dtype if t.is_floating_point() else None)

    return apply_to_collection(args, Tensor, convert), apply_to_collection(kwargs, Tensor, convert)


def _to_student(value: Any, device: torch.device | None) -> Any:
    """A copy of every tensor on the student's ``device``, floating point as float32 (a normal tensor, not an
    inference tensor: one copy that converts and leaves inference mode at once)."""

    def convert(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=torch.float32 if t.is_floating_point() else None, copy=True)

    return _copy_tree(value, convert)


def _clone_tree(value: Any) -> Any:
    return _copy_tree(value, Tensor.clone)


def _copy_tree(value: Any, copy: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return copy(value)
    if isinstance(value, Mapping):
        return {k: _copy_tree(v, copy) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_copy_tree(v, copy) for v in value)
    return value
