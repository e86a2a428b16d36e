"""Feature hints: the features a strategy declares (:class:`~lightning_mtkd.strategies.step.FeaturePair`), read,
sized and compared.

At setup, :func:`prepare_features` fills in the paths left to be found (the input of each model's task
heads), installs the forward hooks that read them, and sizes what each pair trains (an adaptor, or CRD's
heads and banks) from one dry run on two example inputs — the same dry run that sizes a strategy's
other modules (``configure_extra_modules``: fusion's gates). In the step, :func:`hint_terms` compares them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_mtkd.data.examples import example_inputs, training_set_size
from lightning_mtkd.inputs import padding_mask
from lightning_mtkd.losses.functional import feature_distance, token_feature_distance
from lightning_mtkd.losses.relational import rkd_loss
from lightning_mtkd.models.adaptors import Adaptor, CRDHead
from lightning_mtkd.models.hooks import FeatureTap, feature_tensor, find_shared_feature
from lightning_mtkd.strategies.step import DIRECT_DISTANCES, FeaturePair, Step

if TYPE_CHECKING:
    from lightning_mtkd.strategies.distillation import DistillationModule


def prepare_features(module: DistillationModule, stage: str) -> list[FeaturePair]:
    """Resolve, tap and size the module's feature pairs (and its extra modules); returns the resolved pairs."""
    pairs = module.feature_pairs()
    example = None
    if any(p.student is None or p.teacher_path is None for p in pairs):
        example = example_inputs(module, stage)
        found: dict[tuple[str, str], str] = {}  # one search per network, however many pairs read it
        pairs = [_resolve(module, pair, example, found) for pair in pairs]
    _install_taps(module, pairs)
    needs_modules = any(_needs_module(p) and p.adaptor_name not in module.adaptors for p in pairs)
    wants_extras = module.wants_extra_modules and not len(module.extras)
    if needs_modules or wants_extras:
        _build_from_dry_run(module, pairs, example if example is not None else example_inputs(module, stage))
    return pairs


def hint_terms(module: DistillationModule, pairs: list[FeaturePair], step: Step) -> dict[str, Tensor]:
    """``{pair.name: weight · distance}`` for every pair the base compares (``adapt``); CRD only while training."""
    terms = {}
    for pair in pairs:
        if not pair.adapt or (pair.distance_name == "crd" and step.stage != "train"):  # CRD's banks: training only
            continue
        assert pair.student is not None and pair.teacher_path is not None
        student = feature_tensor(step.student.features[pair.student], pair.student)
        teacher = feature_tensor(step.teachers[pair.teacher].features[pair.teacher_path], pair.teacher_path)
        terms[pair.name] = pair.weight * _feature_term(module, pair, student, teacher, step)
    return terms


def _feature_term(
    module: DistillationModule, pair: FeaturePair, student: Tensor, teacher: Tensor, step: Step
) -> Tensor:
    if pair.distance_name == "rkd":
        return rkd_loss(student, teacher)
    if pair.distance_name == "cka":
        return feature_distance(student, teacher, "cka")
    if pair.distance_name == "crd":
        index = step.batch.get("index")
        if not isinstance(index, Tensor):
            raise KeyError(
                "the crd feature distance keys its memory banks by batch['index'] (each sample's position in "
                "its dataset), but this batch has none. Return 'index' from your dataset (MultiTaskDataset does)."
            )
        seed = 1_000_003 * int(module.global_step) + 17  # the same negatives when a run resumes
        all_gather = module.all_gather if module._trainer is not None and module.trainer.world_size > 1 else None
        return module.adaptors[pair.adaptor_name](student, teacher, index, seed, update=True, all_gather=all_gather)
    adapted = module.adaptors[pair.adaptor_name](student)
    if adapted.dim() == 3:  # token features: compared token by token, padding left out
        mask = padding_mask(step.inputs)
        mask = mask if mask is not None and mask.shape == adapted.shape[:2] else None
        return token_feature_distance(adapted, teacher, pair.distance, mask)  # type: ignore[arg-type]
    return feature_distance(adapted, teacher, pair.distance)  # type: ignore[arg-type]


def _resolve(
    module: DistillationModule, pair: FeaturePair, example: Any, found: dict[tuple[str, str], str]
) -> FeaturePair:
    """Fill in the paths left to be found: the input of the task heads (:func:`find_shared_feature`)."""
    student, teacher_path = pair.student, pair.teacher_path
    if student is None:
        key = ("student", pair.student_root)
        if key not in found:
            root = module.model.get_submodule(pair.student_root) if pair.student_root else module.model
            found[key] = find_shared_feature(root, example, module.unpack_inputs, owner=f"student ({pair.name})")
        student = f"{pair.student_root}.{found[key]}" if pair.student_root else found[key]
    if teacher_path is None:
        key = ("teacher", pair.teacher)
        if key not in found:
            owner = f"teacher {pair.teacher!r}"
            found[key] = find_shared_feature(module.teachers[pair.teacher], example, module.unpack_inputs, owner=owner)
        teacher_path = found[key]
    return replace(pair, student=student, teacher_path=teacher_path)


def _install_taps(module: DistillationModule, pairs: list[FeaturePair]) -> None:
    student_paths = sorted({p.student for p in pairs if not p.attention})  # type: ignore[type-var]
    student_attention = sorted({p.student for p in pairs if p.attention})  # type: ignore[type-var]
    if module._student_tap is None and (student_paths or student_attention):
        module._student_tap = FeatureTap(module.model, student_paths, "student", student_attention)  # type: ignore[arg-type]
    for name in module.teachers.names:
        mine = [p for p in pairs if p.teacher == name]
        paths = sorted({p.teacher_path for p in mine if not p.attention})  # type: ignore[type-var]
        attention = sorted({p.teacher_path for p in mine if p.attention})  # type: ignore[type-var]
        if paths or attention:
            module.teachers.tap(name, paths, attention)  # type: ignore[arg-type]


def _build_from_dry_run(module: DistillationModule, pairs: list[FeaturePair], example: Any) -> None:
    """Size the pairs' modules and the strategy's extra modules from one forward pass on two example inputs."""
    was_training = module.model.training
    module.model.eval()
    with torch.no_grad():
        teachers = module.run_teachers({"input": example})
        dry_run = Step("dry_run", {"input": example}, module.student_forward(example), teachers)
    module.model.train(was_training)
    device = module.device
    for pair in pairs:
        name = pair.adaptor_name
        if not _needs_module(pair) or name in module.adaptors:
            continue
        assert pair.student is not None and pair.teacher_path is not None
        student = feature_tensor(dry_run.student.features[pair.student], pair.student, "student")
        teacher_owner = f"teacher {pair.teacher!r}"
        teacher = feature_tensor(
            dry_run.teachers[pair.teacher].features[pair.teacher_path], pair.teacher_path, teacher_owner
        )
        if pair.distance_name == "crd":
            size = training_set_size(module)
            module.adaptors[name] = CRDHead.between(student.shape, teacher.shape, size, pair.crd).to(device)
            continue
        where = f"adaptor {name!r} (student {pair.student!r} → teacher {pair.teacher!r} {pair.teacher_path!r})"
        module.adaptors[name] = Adaptor.between(student.shape, teacher.shape, name=where).to(device)
    if not len(module.extras):
        for name, extra in module.configure_extra_modules(dry_run).items():
            module.extras[name] = extra.to(device)


def _needs_module(pair: FeaturePair) -> bool:
    """Whether a feature pair trains a module of its own (an adaptor, or CRD's heads and banks)."""
    return pair.adapt and pair.distance_name not in DIRECT_DISTANCES
