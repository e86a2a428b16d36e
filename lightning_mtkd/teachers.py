"""The frozen teachers of a distillation module, in one object.

:class:`Teachers` holds every teacher by name, from a module or a checkpoint path, and keeps the
rules of teacher hygiene in one place: loaded on first use, frozen (``requires_grad=False``), in
eval mode whatever ``train()`` the module is put in, moved along with the module, run under
``torch.inference_mode()``, and never part of the module tree — so never in ``state_dict()``,
``parameters()``, the optimizer or DDP's gradient sync (each process holds its own copy). A
student evaluated without its teachers (a checkpoint whose teacher file has moved) simply has
``active`` false.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mtkd.inputs import call_model
from lightning_mtkd.models.hooks import FeatureTap

#: The name under which a single teacher is kept.
TEACHER = "teacher"

#: What a student's checkpoint records for a teacher that was given as a module (its weights are never saved).
UNSAVED_TEACHER = "<teacher given as a module: not saved>"

TeacherSource = nn.Module | str | None


class Teachers:
    """Every teacher of a module, by name, with the taps that read their features.

    Args:
        teacher: A module, a path to a lightning-mtkd checkpoint, or ``{name: module or path}``; a single
            teacher is named :data:`TEACHER`.
        loader: Reads a checkpoint path into the teacher network (see
            :func:`lightning_mtkd.checkpoints.load_teacher`).
    """

    def __init__(self, teacher: TeacherSource | Mapping[str, TeacherSource], loader: Callable[[str, str], nn.Module]):
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
        module = self._load(source, name) if isinstance(source, str) else source
        module.eval()
        module.requires_grad_(False)
        for move in self._move:  # the device and dtype moves the owning module has had since
            module._apply(move)
        return module

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
        teachers loaded later get the same moves."""
        self._move.append(fn)
        for module in self._modules.values():
            module._apply(fn)

    # ------------------------------------------------------------------------------ forward
    def tap(self, name: str, paths: Sequence[str], attention_paths: Sequence[str] = ()) -> None:
        """Record the features at ``paths`` (and attention weights at ``attention_paths``) of teacher ``name``."""
        if name not in self._taps:
            self._taps[name] = FeatureTap(self[name], paths, owner=f"teacher {name!r}", attention_paths=attention_paths)

    def run(self, inputs: Any, unpack: bool = True) -> dict[str, tuple[Any, dict[str, Any]]]:
        """``{name: (raw output, tapped features)}`` of every teacher, computed under ``torch.inference_mode()``.

        Inference tensors cannot be saved for backward, so outputs and features are cloned outside
        inference mode (cheap: logits and a few feature maps).
        """
        with torch.inference_mode():
            raw = {
                name: (call_model(teacher, inputs, unpack), self._pop(name)) for name, teacher in self.modules().items()
            }
        return {name: (_clone_tree(output), _clone_tree(features)) for name, (output, features) in raw.items()}

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


def _clone_tree(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_tree(v) for v in value)
    return value
