"""Per-step bookkeeping whose cost barely grows with the number of tasks: task metrics and logged terms.

A multi-task step used to update one ``MetricCollection`` and make one ``log_dict`` call per task, and
log every loss term under its own key: about 0.7 ms per task and step on a tiny model, most of it
Lightning's per-call logging cost. Here, per stage:

* :class:`TaskGroupMetrics` — one torchmetrics ``Metric`` per group of tasks of the same kind, width and
  missing-label value, updated for the whole group at once from stacked outputs
  (:func:`~lightning_mtkd.metrics.task_statistics`: counts and sums, no host sync) and reduced to each
  task's metrics at epoch end (:func:`~lightning_mtkd.metrics.task_metric_values`). Its state is summed
  over DDP processes like any torchmetrics state, so a synced epoch equals a one-process evaluation.
* :class:`TermMeans` — the batch-size-weighted epoch mean of every named loss term, one stacked vector
  added per step (also DDP-summed: training terms are global means, as evaluation terms always were).
* Per-task *views* (:class:`TaskMetricView`, :class:`TermView`): stateless ``Metric`` objects, one per
  logged key (``val/left/acc``, ``train/left/kd``), handed to ``LightningModule.log`` once per loop run.
  Lightning computes each at epoch end (the view reads its row of the group's synced result) and resets
  it (which resets the group), so users see the same per-task keys as before while a step makes no
  per-task log call.

:class:`TaskMetrics` ties them together for one stage (``module.val_metrics``); ``module.val_metrics[task]``
is a ``MetricCollection`` of that task's views, so ``val_metrics["left"]["acc"].compute()`` and
``val_metrics["left"].compute()`` work as with plain torchmetrics collections.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lightning_mtkd.metrics import KIND_METRICS, task_metric_values, task_statistics
from lightning_mtkd.tasks import REAL_KINDS, Task

#: Kinds whose labels are class indices (one per sample or pixel), not shaped like the output.
_INDEX_KINDS = ("classification", "segmentation")


class TaskGroupMetrics(Metric):
    """The metrics of several tasks of one kind and width, accumulated together from stacked outputs.

    Args:
        kind: The tasks' kind (``Task.kind``).
        num_classes: Their width (``Task.num_classes``).
        missing_value: The label that marks a missing target (``Task.missing_value``).
        names: The tasks, in row order.

    Example:
        >>> group = TaskGroupMetrics("classification", 3, -100, ["a", "b"])
        >>> logits = [torch.tensor([[5.0, 0, 0], [0, 5, 0]]), torch.tensor([[0.0, 0, 5], [5, 0, 0]])]
        >>> group.update(logits, [torch.tensor([0, 2]), torch.tensor([2, -100])])
        >>> group.compute()["acc"]
        tensor([0.5000, 1.0000])
    """

    full_state_update = False
    counts: Tensor
    sums: Tensor
    names: list[str]

    def __init__(self, kind: str, num_classes: int, missing_value: float, names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kind, self.num_classes, self.missing_value = kind, num_classes, float(missing_value)
        self.names = list(names)
        tasks = len(self.names)
        shape = {
            "classification": (2,),
            "multilabel": (num_classes, 3),
            "regression": (1,),
            "segmentation": (num_classes, num_classes),
            "depth": (1,),
            "normals": (2,),
        }[kind]
        self.add_state("counts", torch.zeros(tasks, *shape, dtype=torch.long), dist_reduce_fx="sum")
        if kind in REAL_KINDS:
            self.add_state(
                "sums", torch.zeros(tasks, 2 if kind != "normals" else 1, dtype=torch.float64), dist_reduce_fx="sum"
            )
        self._rows: dict[tuple[int, ...], Tensor] = {}

    def update(self, outputs: Sequence[Tensor], targets: Sequence[Tensor], rows: Sequence[int] | None = None) -> None:
        """Add one batch: ``outputs[i]`` and ``targets[i]`` are the task of row ``rows[i]`` (default: all, in order)."""
        if self.kind not in _INDEX_KINDS:  # a (B,) regression target, a (B, H, W) depth map
            targets = [target.reshape(output.shape) for output, target in zip(outputs, targets, strict=True)]
        try:
            preds, labels = torch.stack(list(outputs)), torch.stack(list(targets))
        except RuntimeError:  # tasks of different sizes (dense maps at several resolutions): one at a time
            for i, (output, target) in enumerate(zip(outputs, targets, strict=True)):
                self._add(output.unsqueeze(0), target.unsqueeze(0), [rows[i] if rows is not None else i])
            return
        self._add(preds, labels, rows)

    def _add(self, preds: Tensor, target: Tensor, rows: Sequence[int] | None) -> None:
        if math.isnan(self.missing_value):
            valid = ~torch.isnan(target)
        else:
            valid = target != (self.missing_value if self.kind in REAL_KINDS else int(self.missing_value))
        counts, sums = task_statistics(self.kind, preds.detach(), target, valid, self.num_classes)
        # Out of place, as torchmetrics does: a module sent to ddp_spawn's processes shares its tensors' memory
        # with them (and they with each other), so an in-place add would count every rank's batches everywhere.
        if rows is None or len(rows) == len(self.names) and list(rows) == list(range(len(self.names))):
            self.counts = self.counts + counts
            if sums is not None:
                self.sums = self.sums + sums
            return
        index = self._index(tuple(rows))
        self.counts = self.counts.index_add(0, index, counts)
        if sums is not None:
            self.sums = self.sums.index_add(0, index, sums)

    def _index(self, rows: tuple[int, ...]) -> Tensor:
        # Built once per subset and device: a tensor made from a list each step would copy host → device.
        index = self._rows.get(rows)
        if index is None or index.device != self.counts.device:
            index = self._rows[rows] = torch.tensor(rows, dtype=torch.long, device=self.counts.device)
        return index

    def compute(self) -> dict[str, Tensor]:
        """Each metric of each task, ``{name: (T,)}`` in row order."""
        ignore = None if self.kind in REAL_KINDS else int(self.missing_value)
        return task_metric_values(self.kind, self.counts, self.sums if self.kind in REAL_KINDS else None, ignore)


class TermMeans(Metric):
    """Batch-size-weighted epoch means of named scalar terms, one stacked vector added per step.

    Names are registered as they first appear; the state grows with them (every DDP process sees the same
    terms, so the states agree in shape when they are summed).

    Example:
        >>> means = TermMeans()
        >>> means.update(("a", "b"), [torch.tensor(1.0), torch.tensor(2.0)], 2)
        >>> means.update(("a", "b"), [torch.tensor(4.0), torch.tensor(5.0)], 1)
        >>> means.compute()
        tensor([2., 3.])
    """

    full_state_update = False
    sums: Tensor
    weights: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sums", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weights", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.names: list[str] = []
        self._slots: dict[tuple[str, ...], Tensor | None] = {}

    def update(self, names: tuple[str, ...], values: Sequence[Tensor], weight: int) -> None:
        """Add ``values`` (0-d tensors, in the order of ``names``) with weight ``weight`` (the batch size)."""
        if not values:
            return
        if names not in self._slots:
            self._register(names)
        try:
            stacked = torch.stack(list(values))
        except (TypeError, RuntimeError):  # numbers or 1-element tensors among them
            stacked = torch.stack([torch.as_tensor(v, device=self.sums.device).reshape(()) for v in values])
        stacked = stacked.to(device=self.sums.device, dtype=torch.float64)
        index = self._slots[names]
        if index is None:  # every registered term, in order: the common case (out of place: see TaskGroupMetrics)
            self.sums = self.sums + stacked * weight
            self.weights = self.weights + weight
        else:
            if index.device != self.sums.device:
                index = self._slots[names] = index.to(self.sums.device)
            self.sums = self.sums.index_add(0, index, stacked * weight)
            self.weights = self.weights.index_add(0, index, torch.full_like(stacked, weight))

    def _register(self, names: tuple[str, ...]) -> None:
        new = [name for name in dict.fromkeys(names) if name not in self.names]
        if new:
            self.names += new
            grown = torch.zeros(len(new), dtype=torch.float64, device=self.sums.device)
            self.sums = torch.cat([self.sums, grown])
            self.weights = torch.cat([self.weights, grown])
            self._defaults["sums"] = torch.zeros(len(self.names), dtype=torch.float64)
            self._defaults["weights"] = torch.zeros(len(self.names), dtype=torch.float64)
            self._slots = {key: None if list(key) == self.names else self._slot(key) for key in self._slots}
        self._slots[names] = None if list(names) == self.names else self._slot(names)

    def _slot(self, names: tuple[str, ...]) -> Tensor:
        return torch.tensor([self.names.index(name) for name in names], dtype=torch.long, device=self.sums.device)

    def compute(self) -> Tensor:
        """Each term's mean, in the order of ``names`` (NaN for a term never added this epoch)."""
        return (self.sums / self.weights).float()


class _View(Metric):
    """A stateless per-key stand-in that Lightning logs: reads one value of a shared metric's result."""

    full_state_update = False
    _owner: TaskMetrics

    def __init__(self, owner: TaskMetrics) -> None:
        # Nothing of its own to sync or cache: the source metric syncs its state once and caches its result.
        super().__init__(sync_on_compute=False, compute_with_cache=False)
        self.__dict__["_owner"] = owner  # a reference, not a submodule

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{type(self).__name__} is updated through its TaskMetrics, not directly.")

    def reset(self) -> None:
        super().reset()
        self._owner._reset_from_view()


class TaskMetricView(_View):
    """One metric of one task (``val/left/acc``), read from its group's epoch result."""

    _group: TaskGroupMetrics

    def __init__(self, owner: TaskMetrics, group: TaskGroupMetrics, row: int, metric: str) -> None:
        super().__init__(owner)
        self.__dict__["_group"] = group
        self.row, self.metric = row, metric

    @property
    def update_called(self) -> bool:
        return self._group.update_called

    def compute(self) -> Tensor:
        return self._group.compute()[self.metric].reshape(-1)[self.row]  # one task's result comes squeezed


class TermView(_View):
    """The epoch mean of one logged term (``train/left/kd``)."""

    def __init__(self, owner: TaskMetrics, row: int) -> None:
        super().__init__(owner)
        self.row = row

    @property
    def update_called(self) -> bool:
        return self._owner.terms.update_called

    def compute(self) -> Tensor:
        return self._owner.terms.compute().reshape(-1)[self.row]


class TaskMetrics(nn.Module):
    """One stage's metrics of every task (the student's, or the teachers' with ``who="teacher_"``) and its terms.

    ``update`` adds a batch of outputs, ``update_terms`` a step's loss terms, and ``log_to(module)`` hands the
    per-key views to ``module.log`` — once per loop run, whatever the number of steps and tasks. Keys are
    ``{stage}/{task}/{who}{metric}`` for metrics and ``{stage}/{task}/{kind}`` or ``{stage}/{name}`` for terms.

    Args:
        tasks: The tasks, by name.
        stage: ``train``, ``val`` or ``test``.
        who: Prefix of the metric names (``"teacher_"`` for a teacher's metrics).

    Example:
        >>> metrics = TaskMetrics({"a": Task("a", num_classes=3)}, "val")
        >>> metrics.update({"a": torch.tensor([[5.0, 0, 0], [0, 5, 0]])}, {"a": torch.tensor([0, 2])})
        >>> metrics["a"].compute()
        {'val/a/acc': tensor(0.5000)}
    """

    groups: nn.ModuleList
    collections: nn.ModuleDict
    terms: TermMeans
    _term_views: dict[str, TermView]

    def __init__(self, tasks: Mapping[str, Task], stage: str, who: str = "") -> None:
        super().__init__()
        self.stage, self.who = stage, who
        members: dict[tuple[str, int, str], list[str]] = {}
        for name, task in tasks.items():
            members.setdefault((task.kind, task.num_classes, repr(float(task.missing_value))), []).append(name)
        self._groups = [
            TaskGroupMetrics(kind, width, tasks[names[0]].missing_value, names)
            for (kind, width, _), names in members.items()
        ]
        self.groups = nn.ModuleList(self._groups)  # registered (moved with the module); iterated as the typed list
        collections: dict[str, MetricCollection] = {}
        for group in self._groups:
            for row, name in enumerate(group.names):
                views: dict[str, Metric | MetricCollection] = {
                    metric: TaskMetricView(self, group, row, metric) for metric in KIND_METRICS[group.kind]
                }
                collections[name] = MetricCollection(views, prefix=f"{stage}/{name}/{who}", compute_groups=False)
        self.collections = nn.ModuleDict({name: collections[name] for name in tasks})
        self.terms = TermMeans()
        self.__dict__["_term_views"] = {}  # name -> TermView; plain dict: created as terms first appear
        self._term_keys: dict[tuple[Any, ...], tuple[str, ...]] = {}
        self._seen: set[str] = set()  # tasks updated since the last reset (plain Python: no sync)
        self._logged: set[str] = set()  # keys handed to Lightning in the current loop run
        self._pending = False
        self._results: Any = None

    # ------------------------------------------------------------------------------ the MetricCollection-like face
    def __getitem__(self, task: str) -> MetricCollection:
        return cast(MetricCollection, self.collections[task])

    def __contains__(self, task: object) -> bool:
        return isinstance(task, str) and task in self.collections._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.collections)

    def __len__(self) -> int:
        return len(self.collections)

    def keys(self) -> Iterator[str]:
        return iter(self.collections)

    def items(self) -> Iterator[tuple[str, MetricCollection]]:
        return iter(self.collections.items())  # type: ignore[arg-type]

    def compute(self) -> dict[str, Tensor]:
        """Every task's metrics by logged key (the tasks updated since the last reset)."""
        seen = [name for name in self.collections if name in self._seen]
        return {key: value for name in seen for key, value in self[name].compute().items()}

    # ------------------------------------------------------------------------------ the step
    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], module: Any = None) -> None:
        """Add one batch of the tasks in ``outputs`` (tasks missing from it are skipped); with the
        LightningModule ``module``, log what this loop run has not logged yet (:meth:`log_to`)."""
        self._start(module)
        for group in self._groups:
            names = group.names
            if all(name in outputs for name in names):
                group.update([outputs[n] for n in names], [targets[n] for n in names])
            else:
                present = [row for row, name in enumerate(names) if name in outputs]
                if not present:
                    continue
                group.update([outputs[names[r]] for r in present], [targets[names[r]] for r in present], present)
            if not self._seen.issuperset(names):
                self._seen.update(name for name in names if name in outputs)
                self._pending = True
        self.log_to(module)

    def update_terms(
        self,
        task_losses: Mapping[str, Tensor],
        distill_terms: Mapping[str, Tensor],
        logs: Mapping[str, Tensor],
        weight: int,
        module: Any = None,
    ) -> None:
        """Add a step's terms — ``{task: loss}``, ``{"kind/task" or "name": term}`` and other values to log — with
        weight ``weight`` (the batch size); with ``module``, log what this loop run has not logged yet."""
        self._start(module)
        key = (tuple(task_losses), tuple(distill_terms), tuple(logs))
        names = self._term_keys.get(key)
        if names is None:
            names = self._term_keys[key] = self._term_names(*key)
        self.terms.update(names, [*task_losses.values(), *distill_terms.values(), *logs.values()], weight)
        if len(self._term_views) < len(self.terms.names):
            for row, name in enumerate(self.terms.names):
                self._term_views.setdefault(name, TermView(self, row))
            self._pending = True
        self.log_to(module)

    def _term_names(self, tasks: tuple[str, ...], terms: tuple[str, ...], logs: tuple[str, ...]) -> tuple[str, ...]:
        stage = self.stage
        names = [f"{stage}/{task}/loss" for task in tasks]
        for term in terms:
            kind, _, task = term.partition("/")
            names.append(f"{stage}/{task}/{kind}" if task else f"{stage}/{kind}")
        names += [f"{stage}/{name}" for name in logs]
        return tuple(names)

    def _start(self, module: Any) -> None:
        """Notice a new loop run (a new result collection) before adding to the state.

        Lightning resets every logged view when a loop run ends, and that resets the state; a run that
        ended without it (interrupted) left its partial state behind, dropped here.
        """
        trainer = getattr(module, "_trainer", None)
        results = getattr(trainer, "_results", None)
        if results is self._results:
            return
        if self._results is not None:
            self._reset_state()
        self._results, self._logged, self._pending = results, set(), True

    def log_to(self, module: Any) -> None:
        """Hand every key not yet logged in this loop run to ``module.log`` (a no-op on most steps).

        Each key is a stateless view that Lightning computes at epoch end and then resets (which resets the
        state here), so the step itself makes no per-task log call.
        """
        if not self._pending:
            return
        trainer = getattr(module, "_trainer", None)
        if trainer is None or getattr(trainer, "barebones", False):
            return  # a step called by hand, or logging switched off
        self._pending = False
        for name in self.collections:
            if name in self._seen:
                for key, view in self[name].items():
                    self._log(module, key, view, f"{self.stage}_metrics")
        for key, view in self._term_views.items():
            self._log(module, key, view, f"{self.stage}_metrics.terms")

    def _log(self, module: Any, key: str, view: Metric, attribute: str) -> None:
        if key not in self._logged:
            module.log(key, view, on_step=False, on_epoch=True, batch_size=1, metric_attribute=attribute)
            self._logged.add(key)

    def _reset_from_view(self) -> None:
        # Lightning resets every logged view at the end of a loop run: the next epoch starts afresh. The first
        # view's reset does it; the others find nothing to do.
        if self._logged or self._seen or self.terms.update_called:
            self._reset_state()
        self._logged, self._pending = set(), True

    def _reset_state(self) -> None:
        for group in self._groups:
            group.reset()
        self.terms.reset()
        self._seen = set()
