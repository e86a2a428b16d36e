"""Online distillation: teachers that learn along with the student, so no frozen teacher is needed."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mtkd.checkpoints import as_module
from lightning_mtkd.inputs import call_model
from lightning_mtkd.strategies.base import HintDistance, ModelOutputs, Step
from lightning_mtkd.strategies.distillation import DistillationModule
from lightning_mtkd.strategies.shared import SharedDistiller
from lightning_mtkd.strategies.step import CRD
from lightning_mtkd.tasks import Task


class SelfDistiller(SharedDistiller):
    r"""Self-distillation from a mean teacher: a :class:`SharedDistiller` whose teacher is an exponential moving
    average of the student.

    After every optimizer step the teacher's weights follow the student's,

    .. math::
        \theta^{t} \leftarrow m\,\theta^{t} + (1 - m)\,\theta^{s},

    as in the mean teacher of Tarvainen & Valpola (NeurIPS 2017) and the self-distillation of BYOL/DINO,
    and the student distils the teacher's outputs per task with any ``kd_loss`` (and, with
    ``hint_weight > 0``, its features with any feature distance): a smoothed copy of itself that is
    more stable across steps. The teacher starts as a copy of the student, is never in the optimizer,
    stays in eval mode, and is saved in the checkpoint (``ema.*``), so a resumed run continues it exactly.

    Args:
        student: The multi-task student.
        tasks: The tasks.
        ema_decay: :math:`m`, in [0, 1).
        student_feature, teacher_feature: Feature paths for the hint (``None``: the input of the task heads).
        hint_weight: The hint's weight (0, the default: soft targets only).
        distance: How the hint compares features (see :class:`~lightning_mtkd.strategies.base.FeaturePair`).
        **kwargs: Everything else :class:`DistillationModule` takes (``temperature``, ``alpha``, ``kd_loss``, …).

    Example (YAML)::

        model:
          class_path: lightning_mtkd.SelfDistiller
          init_args:
            student: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {...}}
            tasks: [{name: left, num_classes: 10}, {name: right, num_classes: 10}]
            ema_decay: 0.99
    """

    fixed_parameters = ("teacher",)
    requires_multitask_teacher = True
    fixed_teachers = False

    def __init__(
        self,
        student: nn.Module,
        tasks: list[Task],
        ema_decay: float = 0.99,
        student_feature: str | None = None,
        teacher_feature: str | None = None,
        hint_weight: float = 0.0,
        distance: HintDistance | CRD = "l2",
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1) (1 would never move the teacher), got {ema_decay}.")
        student = as_module(student, "student")
        ema = copy.deepcopy(student)
        # SharedDistiller whose teacher is the student's own moving average: its hint and soft targets as they are.
        super().__init__(student, ema, tasks, student_feature, teacher_feature, hint_weight, distance, **kwargs)
        for option, value, default in (
            ("teacher_precision", self.teachers.precision, "32"),
            ("teacher_device", self.teachers.device, None),
        ):
            if value != default:
                # The average is training state moved by small steps ((1 - m) · difference): in bf16 they vanish,
                # and on another device every step would copy the student's weights across.
                raise ValueError(
                    f"SelfDistiller keeps its moving-average teacher in float32 beside the student: {option}="
                    f"{str(value)!r} is not supported; leave it out (it applies to frozen teachers)."
                )
        # A submodule, unlike a frozen teacher: its weights are training state, saved and resumed with the run.
        self.ema = ema
        self.ema_decay = float(ema_decay)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            for average, current in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                average.lerp_(current.detach(), 1.0 - self.ema_decay)
            for kept, running in zip(self.ema.buffers(), self.model.buffers(), strict=True):
                kept.copy_(running)  # running statistics follow the student as they are


class MutualDistiller(DistillationModule):
    r"""Deep mutual learning (Zhang et al., *Deep Mutual Learning*, CVPR 2018) for multi-task models.

    A student and one or more peers train together from scratch, each from the labels and from the
    others' predictions, detached: for a network :math:`k` and each task :math:`t` it predicts,

    .. math::
        \mathcal{L}_k = \sum_t w_t\Big[(1-\alpha)\,\mathcal{L}^{sup}_{kt}
        + \frac{\alpha}{|P_t| - 1}\sum_{j \in P_t,\, j \neq k}
        \mathcal{L}^{KD}\big(z_{kt},\ \mathrm{sg}(z_{jt})\big)\Big]

    over the networks :math:`P_t` that predict :math:`t` (a single-task peer named after its task
    joins only that task), with any ``kd_loss``. The student's loss goes through the shared step (its
    metrics are the module's, ``val/<task>/acc``; the peer named after a task, else the first that
    predicts it, is logged as its teacher, ``val/<task>/teacher_acc``); each peer's loss is added as it is and logged as
    ``<stage>/peer_<name>``. Peers are trainable modules of the strategy (``module.extras``, the
    adaptors' parameter group), never frozen, saved in the checkpoint, and each exports alone
    (``lightning-mtkd export --student extras.<name>``).

    Args:
        student: The multi-task student (the network the module's metrics and export are about).
        peers: ``{name: network}``; a network named after a task may predict only that task.
        tasks: The tasks.
        **kwargs: Everything else :class:`DistillationModule` takes (``temperature``, ``alpha``, ``kd_loss``, …).

    Example (YAML)::

        model:
          class_path: lightning_mtkd.MutualDistiller
          init_args:
            student: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {...}}
            peers: {left: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {..., heads: {left: 10}}}}
            tasks: [{name: left, num_classes: 10}, {name: right, num_classes: 10}]
    """

    fixed_parameters = ("teacher",)
    online = True
    fixed_teachers = False

    def __init__(self, student: nn.Module, peers: dict[str, nn.Module], tasks: list[Task], **kwargs: Any) -> None:
        if not isinstance(peers, Mapping) or not peers:
            raise TypeError("MutualDistiller needs peers: pass `peers` as a dict {name: network}.")
        super().__init__(student, {}, tasks, **kwargs)
        for name, peer in peers.items():
            self.extras[name] = as_module(peer, f"peers[{name!r}]")

    def teacher_forward(self, batch: Mapping[str, Any]) -> dict[str, ModelOutputs]:
        """The peers' outputs, with gradients: they learn in this step too."""
        return {
            name: ModelOutputs(
                self.task_outputs(call_model(peer, batch["input"], self.unpack_inputs), f"peer {name!r}", False, name)
            )
            for name, peer in self.extras.items()
        }

    def distillation_loss(self, step: Step) -> dict[str, Tensor]:
        """The student's KD terms from every peer (detached); each peer's own loss goes to ``step.losses``."""
        networks = {"student": step.student, **step.teachers}
        for name in step.teachers:
            step.losses[f"peer_{name}"] = self._network_loss(name, networks, step)
        return {f"kd/{task}": term for task, term in self._kd_terms("student", networks, step).items()}

    def _kd_terms(self, own: str, networks: Mapping[str, ModelOutputs], step: Step) -> dict[str, Tensor]:
        """Per task ``own`` predicts: its mean distillation loss from the other networks that predict the task."""
        terms = {}
        for task, spec in self.tasks.items():
            if task not in networks[own].outputs:
                continue
            others = [
                out.outputs[task].detach() for name, out in networks.items() if name != own and task in out.outputs
            ]
            if others:
                losses = [
                    spec.distillation_loss(
                        networks[own].outputs[task],
                        other,
                        self.temperature,
                        self.kd_losses.get(task),
                        step.labels[task],
                    )
                    for other in others
                ]
                terms[task] = torch.stack(losses).mean()
        return terms

    def _network_loss(self, name: str, networks: Mapping[str, ModelOutputs], step: Step) -> Tensor:
        alpha, outputs = self.distillation_alpha, networks[name].outputs
        kd = self._kd_terms(name, networks, step)
        total = torch.zeros((), device=next(iter(outputs.values())).device)
        for task, spec in self.tasks.items():
            if task in outputs:
                supervised = spec.supervised_loss(outputs[task], step.labels[task])
                total = total + spec.weight * ((1 - alpha) * supervised + alpha * kd.get(task, 0.0))
        return total
