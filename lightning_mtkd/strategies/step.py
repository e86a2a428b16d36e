"""What one step of the shared step carries, and the declarations strategies make about features.

:class:`Step` carries one batch through the shared step (its hooks read and extend it);
:class:`FeaturePair` declares a feature the student learns from a teacher's, and :data:`HintDistance`
how the two are compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

from torch import Tensor

from lightning_mtkd.teachers import TEACHER

if TYPE_CHECKING:
    from lightning_mtkd.strategies.distillation import DistillationModule


@dataclass
class ModelOutputs:
    """What one forward pass of a teacher or the student produced: task outputs and tapped features by path."""

    outputs: dict[str, Tensor]
    features: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """What the shared step has computed so far; the strategy hooks read it.

    A hook may add loss terms of its own to ``terms`` (fusion's gate loss; weighted like the distillation
    terms), whole losses of other trained networks to ``losses``, and values to log, averaged over the epoch
    as ``<stage>/<name>``, to ``logs``.
    """

    stage: str
    batch: Mapping[str, Any]
    student: ModelOutputs
    teachers: dict[str, ModelOutputs]
    #: Per task, the teacher output the student distils (``teacher_targets``).
    targets: dict[str, Tensor] = field(default_factory=dict)
    terms: dict[str, Tensor] = field(default_factory=dict)
    logs: dict[str, Tensor] = field(default_factory=dict)
    #: Whole losses of other networks trained in the same step (a mutual-learning peer's), added to the total as
    #: they are (not through the weighting plug-in) and logged as ``<stage>/<name>``.
    losses: dict[str, Tensor] = field(default_factory=dict)

    @property
    def inputs(self) -> Any:
        return self.batch["input"]

    @property
    def labels(self) -> Mapping[str, Tensor]:
        return self.batch["targets"]


@dataclass(frozen=True)
class FeaturePair:
    """A student feature taught by a teacher feature: both read by forward hooks, by dotted path.

    Args:
        name: The term's name: ``"hint"`` (shared), ``"feat/<task>"`` (weighted as that task).
        student: Path in the student; ``None``: the input of its task heads, found by a dry run
            (:func:`~lightning_mtkd.models.hooks.find_shared_feature`), searched under ``student_root``.
        teacher_path: Path in the teacher; ``None``: the input of its task heads.
        teacher: The teacher's name.
        weight: The term's weight.
        distance: How student and teacher features are compared (:data:`HintDistance`): through an adaptor
            by ``l2`` (on channel-normalised features), ``l1`` or ``cosine``; directly by ``cka`` (linear CKA)
            or ``rkd`` (the relations between the batch's samples); or contrastively by ``crd`` (or a
            :class:`CRD` with settings of its own).
        adapt: Bridge them with a trainable :class:`~lightning_mtkd.models.Adaptor` and add the term to the
            default :meth:`DistillationModule.distillation_loss`; ``False`` only records both features (a
            strategy compares them itself, as attention distillation does).
        attention: Record attention weights ``(B, heads, queries, keys)`` rather than the layer's output.
        student_root: Where to search for ``student=None`` (one network of several, e.g. ``"left"``).
        adaptor: The adaptor's name in ``module.adaptors`` (default: ``name`` with ``/`` as ``_``).
    """

    name: str
    student: str | None = None
    teacher_path: str | None = None
    teacher: str = TEACHER
    weight: float = 1.0
    distance: HintDistance | CRD = "l2"
    adapt: bool = True
    attention: bool = False
    student_root: str = ""
    adaptor: str | None = None

    @property
    def distance_name(self) -> str:
        """The distance's name: ``distance``, or ``"crd"`` for :class:`CRD` settings."""
        return "crd" if isinstance(self.distance, CRD) else self.distance

    @property
    def crd(self) -> CRD:
        """The CRD settings of a ``crd`` pair."""
        return self.distance if isinstance(self.distance, CRD) else CRD()

    @property
    def adaptor_name(self) -> str:
        # Module names cannot hold '.', and '/' separates a term's kind from its task.
        return self.adaptor or self.name.replace("/", "_")


#: How a feature hint compares the student's feature with the teacher's:
#:
#: - ``l2``, ``l1``, ``cosine``: the student's feature mapped by a trainable adaptor to the teacher's shape,
#:   then compared position by position on channel-normalised features (FitNets, Romero et al., ICLR 2015;
#:   Li & Bilen, ECCV-W 2020) — :func:`~lightning_mtkd.losses.functional.feature_distance`;
#: - ``cka``: ``1 - CKA`` between the two batches of features (Kornblith et al., ICML 2019), any widths, no
#:   adaptor;
#: - ``rkd``: distance- and angle-wise relations between the batch's samples (Park et al., CVPR 2019), any
#:   widths, no adaptor — :func:`~lightning_mtkd.losses.relational.rkd_loss`;
#: - ``crd``: contrastive representation distillation (Tian et al., ICLR 2020) with projection heads and
#:   memory banks keyed by ``batch["index"]`` (:class:`~lightning_mtkd.models.adaptors.CRDHead`); training only.
#:
#: ``crd`` runs with the paper's settings; pass a :class:`CRD` to change them.
HintDistance = Literal["l2", "cosine", "l1", "cka", "rkd", "crd"]


@dataclass(frozen=True)
class CRD:
    """The ``crd`` feature distance with settings of its own (Tian, Krishnan & Isola, ICLR 2020).

    Pass it where a strategy takes ``distance`` (``distance=CRD(negatives=4096)``; in YAML
    ``distance: {class_path: lightning_mtkd.strategies.CRD, init_args: {negatives: 4096}}``); ``distance="crd"``
    is ``CRD()``.

    Args:
        dim: The size both features are projected to (128 in the paper).
        negatives: Negatives per sample from the memory banks (the paper: 16,384 on CIFAR-100; capped at the
            training set's size − 1).
        temperature: The softmax temperature of the contrast (0.07).
        momentum: The memory banks' momentum (0.5).

    Example:
        >>> CRD(negatives=64)
        CRD(dim=128, negatives=64, temperature=0.07, momentum=0.5)
    """

    dim: int = 128
    negatives: int = 512
    temperature: float = 0.07
    momentum: float = 0.5

    def __post_init__(self) -> None:
        if self.dim < 1 or self.negatives < 1:
            raise ValueError(f"CRD needs dim >= 1 and negatives >= 1, got dim={self.dim}, negatives={self.negatives}.")
        if not self.temperature > 0:
            raise ValueError(f"CRD's temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"CRD's momentum (the banks' share kept) must lie in [0, 1), got {self.momentum}.")


def as_distance(distance: HintDistance | CRD | Mapping[str, Any]) -> HintDistance | CRD:
    """A strategy's ``distance`` argument checked: a :data:`HintDistance` name, or :class:`CRD` settings (also as
    the dict a checkpoint stores them as).

    Example:
        >>> as_distance({"negatives": 64}), as_distance("cka")
        (CRD(dim=128, negatives=64, temperature=0.07, momentum=0.5), 'cka')
    """
    if isinstance(distance, CRD):
        return distance
    if isinstance(distance, Mapping):
        return CRD(**distance)
    if distance not in get_args(HintDistance):
        raise ValueError(
            f"unknown feature distance {distance!r}: use one of {list(get_args(HintDistance))} or CRD settings "
            "(lightning_mtkd.strategies.CRD)."
        )
    return distance


#: The distances that compare features as they are (no adaptor is built for them).
DIRECT_DISTANCES = ("cka", "rkd")


class TeacherOutputSource(Protocol):
    """Something that can stand in for the teachers' forward pass (the teacher-output cache)."""

    def teacher_outputs(self, module: DistillationModule, batch: Mapping[str, Any]) -> dict[str, ModelOutputs]:
        """The teachers' outputs for ``batch``; may call ``module.run_teachers(batch)`` for what it lacks."""
        ...
