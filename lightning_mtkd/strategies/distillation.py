r"""The distillation template: ``DistillationModule``, the frozen teachers and the hooks a strategy overrides.

Each of the six strategies overrides at most two of them:

===========================  ======================================================================
hook                         what it decides (default)
===========================  ======================================================================
``feature_pairs()``          which features the student learns from a teacher's (none)
``teacher_targets(step)``    the teacher output each task distils (the task's own teacher's)
``distillation_loss(step)``  the named distillation terms (soft targets per task, plus feature hints)
``configure_extra_modules``  trainable modules sized from a dry run, e.g. fusion gates (none)
``trust_teachers``           what teacher trust's choice changes (kept; read by ``teacher_for_task``)
===========================  ======================================================================

The step they plug into is :meth:`~lightning_mtkd.strategies.base.MultiTaskModule.shared_step`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtkd.bookkeeping import TaskMetrics
from lightning_mtkd.checkpoints import load_teacher
from lightning_mtkd.models.adaptors import Adaptor
from lightning_mtkd.models.deferred import DeferredModules
from lightning_mtkd.strategies.base import MultiTaskModule
from lightning_mtkd.strategies.checks import check_teacher_coverage, per_task_kd_losses
from lightning_mtkd.strategies.features import hint_terms, prepare_features
from lightning_mtkd.strategies.step import FeaturePair, ModelOutputs, Step, TeacherOutputSource
from lightning_mtkd.tasks import KDLoss, Task
from lightning_mtkd.teachers import TEACHER, TeacherPrecision, Teachers
from lightning_mtkd.weighting.base import Weighting


class DistillationModule(MultiTaskModule):
    """Multi-task training with frozen teacher(s): the shared step every distillation strategy uses.

    Teacher hygiene lives in :class:`~lightning_mtkd.teachers.Teachers`: frozen, in eval mode whatever
    ``train()`` is called with, run under ``torch.inference_mode()``, not in the optimizer and not in
    the checkpoint (reloaded from its own path). A teacher's per-task metrics are logged beside the
    student's in every validation and test epoch (``val/left/teacher_acc``), from the outputs the step
    computes anyway. A student checkpoint validates, tests and predicts without its teachers.

    By default the distillation term is per-task soft-target KD (Hinton et al., 2015) from each task's
    teacher, plus the strategy's feature hints (:meth:`feature_pairs`).

    Args:
        student: The network being trained; forward returns ``{task: Tensor}``.
        teacher: A module, a path to a lightning-mtkd checkpoint, or a dict ``{name: module or path}``
            of several teachers (a single-task teacher named after its task may return a bare Tensor).
        tasks: The tasks.
        temperature: Softmax temperature ``T`` of the soft targets (> 0).
        alpha: Weight of distillation against supervision, in [0, 1]:
            ``(1 - alpha) · task loss + alpha · distillation terms``.
        adaptor_lr: Learning rate of the adaptors' (and other strategy modules') parameter group (the
            optimizer's own if ``None``).
        weighting: Task-weighting plug-in.
        optimizer: Optimizer factory, called with the parameter groups.
        scheduler: Optional LR-scheduler factory.
        pseudo_label_missing: While training, let the teacher's prediction (``Task.pseudo_label``: its
            argmax, ``sigmoid > 0.5``, or its value) stand in for each missing label in the supervised
            losses, so unlabelled samples also get a hard target. Metrics keep the real labels only;
            evaluation is unchanged. Every strategy accepts it.
        unpack_inputs: Pass a dict input as keyword arguments to student and teachers (see ``MultiTaskModule``).
        kd_loss: The logit distillation loss, one name for every task or ``{task: name}``: ``kl`` (Hinton's
            soft targets), ``ls`` (the same on standardised logits), ``dkd`` / ``dkd+ls`` (decoupled KD),
            ``dist`` (DIST), ``mse``; ``l1`` / ``cosine`` for depth / normals maps. ``None`` (or a task left
            out): the task kind's natural loss. :data:`lightning_mtkd.tasks.KD_LOSSES` lists what each kind
            accepts; anything else fails here, naming the task.
        teacher_precision: ``"32"``; ``"bf16"`` or ``"16"`` (float16) casts the teachers' weights once and runs them in
            that dtype, outputs returned as float32 (see :class:`~lightning_mtkd.teachers.Teachers`).
        teacher_device: Run the teachers there (``"cpu"`` while the student trains on a GPU); outputs come back to
            the student's device. ``None``: wherever the module is.
    """

    #: Strategies that distil every task from one multi-task teacher (named ``TEACHER``) set this.
    requires_multitask_teacher: bool = False
    #: Strategies whose teachers train along with the student (mutual learning) set this: no frozen teacher needed.
    online: bool = False
    #: False where the teachers' outputs change while training (online teachers, an EMA teacher): the teacher-output
    #: cache must not keep them.
    fixed_teachers: bool = True
    #: Strategies that choose among several teachers set this from their ``teacher_trust`` argument: a
    #: :class:`~lightning_mtkd.callbacks.TeacherTrust` callback is then added (:meth:`configure_callbacks`).
    teacher_trust: bool = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | str | dict[str, nn.Module | str | None] | None,
        tasks: list[Task],
        temperature: float = 4.0,
        alpha: float = 0.5,
        adaptor_lr: float | None = None,
        weighting: Weighting | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        pseudo_label_missing: bool = False,
        unpack_inputs: bool = True,
        kd_loss: KDLoss | dict[str, KDLoss] | None = None,
        teacher_precision: TeacherPrecision = "32",
        teacher_device: str | None = None,
    ) -> None:
        super().__init__(student, tasks, weighting, optimizer, scheduler, unpack_inputs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (soft targets are softmax(z / T)), got {temperature}.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1] (the share of the distillation terms), got {alpha}.")
        if adaptor_lr is not None and adaptor_lr <= 0:
            raise ValueError(f"adaptor_lr must be > 0, got {adaptor_lr}.")
        if not isinstance(pseudo_label_missing, bool):
            raise TypeError(f"pseudo_label_missing must be True or False, got {pseudo_label_missing!r}.")
        if isinstance(teacher, Mapping) and not teacher and not self.online:
            raise ValueError("no teacher given: pass `teacher=` (a module, a checkpoint path, or a dict of them).")
        self.kd_losses = per_task_kd_losses(kd_loss, self.tasks)
        self.temperature = float(temperature)
        self.distillation_alpha = float(alpha)
        self.pseudo_label_missing = pseudo_label_missing
        self.adaptor_lr = adaptor_lr
        # A plain attribute, not a submodule: never in state_dict(), parameters() or DDP's sync.
        self.teachers = Teachers(teacher, load_teacher, precision=teacher_precision, device=teacher_device)
        #: Adaptors, one per feature pair that needs one; sized by a dry run at setup.
        self.adaptors = DeferredModules(Adaptor)
        #: Other modules a strategy trains (``configure_extra_modules``), sized by the same dry run.
        self.extras = DeferredModules()
        self._pairs: list[FeaturePair] = []
        #: ``{task: teacher name}``: tasks that learn from one assigned teacher (``TaskSpecificDistiller``'s
        #: mapping); a task left out takes the teacher named after it, else the first that outputs it.
        self.task_teachers: dict[str, str] = {}
        #: ``{task: teachers kept, best first}`` once :class:`~lightning_mtkd.callbacks.TeacherTrust` has chosen.
        self.trusted: dict[str, list[str]] = {}
        for stage in ("val", "test"):
            setattr(self, f"{stage}_teacher_metrics", self._make_metrics(stage, who="teacher_"))

    # ------------------------------------------------------------------------------ the strategy hooks
    def feature_pairs(self) -> list[FeaturePair]:
        """The features the student learns from the teachers' (none by default)."""
        return []

    def teacher_targets(self, step: Step) -> dict[str, Tensor]:
        """Per task, the output of the teacher that covers it (:meth:`teacher_for_task`)."""
        targets = {}
        for name in self.tasks:
            teacher = self.teacher_for_task(step.teachers, name)
            if teacher is not None:
                targets[name] = teacher.outputs[name]
        return targets

    def distillation_loss(self, step: Step) -> dict[str, Tensor]:
        """Soft targets per task (:meth:`soft_target_terms`) plus the feature hints (:meth:`hint_terms`)."""
        return {**self.soft_target_terms(step), **self.hint_terms(step)}

    def configure_extra_modules(self, dry_run: Step) -> dict[str, nn.Module]:
        """Trainable modules sized from a dry run on two example inputs (none by default).

        Called once at setup when ``extras`` is still empty; the modules go to ``self.extras`` and train in
        the adaptors' parameter group (``adaptor_lr``). Each needs a ``from_state(state_dict, prefix)``
        classmethod, so a checkpoint alone rebuilds it.
        """
        return {}

    def trust_teachers(self, choice: Mapping[str, list[str]], scores: Mapping[str, Mapping[str, float]]) -> None:
        """Take :class:`~lightning_mtkd.callbacks.TeacherTrust`'s choice: ``{task: teachers kept, best first}``
        (``scores``: every teacher's validation score per task it outputs).

        Kept in :attr:`trusted`. A task with an assigned teacher (:attr:`task_teachers`) keeps it unless trust
        dropped it (switching on a tie cost 0.6 points on MultiMNIST, ``benchmarks/results/quality-screens.md``),
        and then learns from the best teacher kept; teachers no task is assigned to any more are not run. An
        assigned teacher that does not output its task is an error: trust chooses among working teachers, it
        does not repair a wrong mapping.
        """
        self.trusted = {task: list(names) for task, names in choice.items()}
        if not self.task_teachers:
            return
        for task, teacher in self.task_teachers.items():
            if teacher not in scores.get(task, {}):
                raise KeyError(_not_output(teacher, task))
        for task, names in self.trusted.items():
            if task in self.task_teachers and names and self.task_teachers[task] not in names:
                self.task_teachers[task] = names[0]
        for name in [n for n in self.teachers.names if n not in self.task_teachers.values()]:
            del self.teachers.sources[name]

    def configure_callbacks(self) -> list[Any]:
        """A :class:`~lightning_mtkd.callbacks.TeacherTrust` where :attr:`teacher_trust` is on and the trainer has
        none of its own."""
        from lightning_mtkd.callbacks.teacher_trust import TeacherTrust

        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set by the Trainer's connector
        if not self.teacher_trust or any(isinstance(c, TeacherTrust) for c in callbacks):
            return []
        return [TeacherTrust()]

    # ------------------------------------------------------------------------------ building blocks for hooks
    def teacher_for_task(self, teachers: Mapping[str, ModelOutputs], task: str) -> ModelOutputs | None:
        """The outputs of the teacher that covers ``task``: its assigned one (:attr:`task_teachers`), else the one
        named after it, else the first that outputs it — among the trusted ones, once trust has chosen."""
        assigned = self.task_teachers.get(task)
        if assigned is not None:
            if task not in teachers[assigned].outputs:
                raise KeyError(_not_output(assigned, task, list(teachers[assigned].outputs)))
            return teachers[assigned]
        order = self.trusted.get(task, list(teachers))  # once trust has chosen: the teachers kept, best first
        candidates = {n: teachers[n] for n in order if n in teachers and task in teachers[n].outputs}
        if task in candidates:
            return candidates[task]
        return next(iter(candidates.values()), None)

    def soft_target_terms(
        self,
        step: Step,
        temperatures: Mapping[str, float] | None = None,
        weights: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """``{"kd/<task>": weight · distillation loss}`` for every task that has a teacher target (``kd_loss``)."""
        student, labels = step.student.outputs, step.labels
        if temperatures is None:  # one temperature: tasks of one kind and width computed together
            losses = self.task_groups.distillation_losses(
                student, step.targets, self.temperature, self.kd_losses, labels
            )
        else:
            losses = {
                name: self.tasks[name].distillation_loss(
                    student[name], target, temperatures[name], self.kd_losses.get(name), labels.get(name)
                )
                for name, target in step.targets.items()
            }
        return {f"kd/{name}": loss if weights is None else weights[name] * loss for name, loss in losses.items()}

    def hint_terms(self, step: Step) -> dict[str, Tensor]:
        r"""``{pair.name: weight · d(f^s, f^t)}`` for every feature pair the base compares: through an adaptor
        (FitNets, Romero et al., ICLR 2015, on normalised features as in Li & Bilen, ECCV-W 2020; token features
        over real tokens only), or by CKA, RKD or CRD (:data:`~lightning_mtkd.strategies.step.HintDistance`)."""
        # Resolved at setup; before it (a hook called by hand) the pairs whose paths are given.
        pairs = self._pairs or [p for p in self.feature_pairs() if p.student and p.teacher_path]
        return hint_terms(self, pairs, step)

    # ------------------------------------------------------------------------------ teachers in the step
    #: Where teacher outputs may come from instead of a forward pass: set by the
    #: :class:`~lightning_mtkd.callbacks.TeacherCache` callback; ``None`` runs the teachers every step.
    teacher_cache: TeacherOutputSource | None = None

    @property
    def teacher(self) -> nn.Module:
        """The single teacher (strategies with one teacher)."""
        return self.teachers[TEACHER]

    def teacher_forward(self, batch: Mapping[str, Any]) -> dict[str, ModelOutputs]:
        """Every teacher's outputs and tapped features: from the teacher cache if one is attached, else computed."""
        if not self.teachers.active:
            return {}
        if self.teacher_cache is not None:
            return self.teacher_cache.teacher_outputs(self, batch)
        return self.run_teachers(batch)

    def run_teachers(self, batch: Mapping[str, Any]) -> dict[str, ModelOutputs]:
        """Every teacher's outputs and tapped features, computed under ``torch.inference_mode()``."""
        if not self.teachers.active:
            return {}
        raw = self.teachers.run(batch["input"], self.unpack_inputs)
        return {
            name: ModelOutputs(self.task_outputs(output, f"teacher {name!r}", required=False, task=name), features)
            for name, (output, features) in raw.items()
        }

    def supervision_targets(self, step: Step) -> Mapping[str, Tensor]:
        r"""With ``pseudo_label_missing``, while training: each task's missing labels replaced by its teacher
        target's pseudo-label (:meth:`Task.fill_missing`), so the supervised loss of task :math:`t` is

        .. math::
            \mathcal{L}^{sup}_t = \frac{1}{B}\sum_b \ell\big(z^s_{tb},\ y_{tb}\ \text{if present, else}\
            \hat y(z^{\tau(t)}_{tb})\big)

        with :math:`z^{\tau(t)}` the task's teacher target (:meth:`teacher_targets`). Without the flag, outside
        training, or without teachers (a student evaluated alone) the labels are returned unchanged.
        """
        if not (self.pseudo_label_missing and step.stage == "train" and step.targets):
            return step.labels
        filled = dict(step.labels)
        for name, target in step.targets.items():
            filled[name] = self.tasks[name].fill_missing(step.labels[name], target)
        return filled

    def check_teacher_outputs(self, step: Step) -> None:
        """Every task must have a teacher target (from *the* teacher if one multi-task teacher is needed)."""
        check_teacher_coverage(self, step)

    # ------------------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        # Fitting needs the teachers (a missing one is an error); evaluating uses them when they are all there,
        # so a student checkpoint validates and tests on its own; predicting never needs them.
        if stage == "predict" or not self.teachers.activate(needed=stage == "fit"):
            self.teachers.active = False
            return
        if self.teacher_cache is not None and not self.fixed_teachers:
            raise RuntimeError(
                f"{type(self).__name__}'s teachers learn while it trains, so their outputs change every step and "
                "cannot be cached: remove the TeacherCache callback."
            )
        self._pairs = prepare_features(self, stage)

    @property
    def wants_extra_modules(self) -> bool:
        """Whether this strategy sizes extra modules from the dry run (it overrides ``configure_extra_modules``)."""
        return type(self).configure_extra_modules is not DistillationModule.configure_extra_modules

    # ------------------------------------------------------------------------------ teacher hygiene
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.teachers.eval()  # teachers never leave eval mode
        return self

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DistillationModule:
        super()._apply(fn, *args, **kwargs)
        self.teachers.apply(fn)  # move along with the module (.to(), .cuda(), .half())
        return self

    # ------------------------------------------------------------------------------ optimisation, metrics
    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        trained = [*self.adaptors.parameters(), *self.extras.parameters()]
        if trained:
            group: dict[str, Any] = {"params": trained, "name": "adaptors"}
            if self.adaptor_lr is not None:
                group["lr"] = self.adaptor_lr
            groups.append(group)
        return groups

    def _update_metrics(self, step: Step) -> None:
        super()._update_metrics(step)
        if step.stage == "train" or not step.targets:
            return
        metrics: TaskMetrics = getattr(self, f"{step.stage}_teacher_metrics")
        metrics.update(step.targets, step.labels, module=self)


def _not_output(teacher: str, task: str, outputs: list[str] | None = None) -> str:
    given = f"outputs only {outputs}" if outputs is not None else "does not output it"
    return (
        f"teacher {teacher!r} teaches task {task!r} but {given}. Give {task!r} a teacher trained on it (name it "
        f"{task!r} or map it in `task_teachers`)."
    )
