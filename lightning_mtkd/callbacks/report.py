"""What distillation bought: teacher vs student per task, their sizes and their inference latency.

:class:`DistillationReport` runs at the end of ``fit`` (on the last validation metrics) and of
``test``, prints a rich table, writes ``report.md`` and ``report.png`` into the run directory and
hands the same figures to every logger: scalars through ``log_metrics`` and, where the logger can
(``WandbLogger``), the table through ``log_table`` and the chart through ``log_image``. Nothing
here imports ``wandb``: the logger's own API is the only way in.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_mtkd.inputs import call_model, first_samples, tensor_leaves, to_device
from lightning_mtkd.models.backbones import count_parameters


@dataclass
class TaskComparison:
    """One task's primary metric for the teacher and the student."""

    task: str
    metric: str
    teacher: float | None
    student: float | None
    higher_is_better: bool = True

    @property
    def gap(self) -> float | None:
        """How far the student is behind the teacher (positive: behind; negative: ahead)."""
        if self.teacher is None or self.student is None:
            return None
        return self.teacher - self.student if self.higher_is_better else self.student - self.teacher


@dataclass
class DistillationSummary:
    """The figures of one report: per-task metrics, parameter counts and latency on one device.

    ``teacher_latency_ms`` is the time of *all* teachers on one batch (what answering every task
    with the teachers costs); ``speedup`` is that over the student's.
    """

    stage: str
    tasks: list[TaskComparison]
    student_params: int
    teacher_params: dict[str, int] = field(default_factory=dict)
    student_latency_ms: float | None = None
    teacher_latency_ms: float | None = None
    device: str = "cpu"
    batch_size: int | None = None

    @property
    def teacher_params_total(self) -> int:
        return sum(self.teacher_params.values())

    @property
    def student_label(self) -> str:
        """``student`` when distilled; ``model`` for a network trained without a teacher (e.g. the teacher itself)."""
        return "student" if self.teacher_params else "model"

    @property
    def speedup(self) -> float | None:
        if not self.student_latency_ms or self.teacher_latency_ms is None:
            return None
        return self.teacher_latency_ms / self.student_latency_ms

    COLUMNS = ("task", "metric", "teacher", "student", "gap")

    def rows(self) -> list[list[Any]]:
        """Per-task rows in :attr:`COLUMNS` order (``None`` where a figure is unknown)."""
        return [[t.task, t.metric, t.teacher, t.student, t.gap] for t in self.tasks]

    def scalars(self) -> dict[str, float]:
        """Flat ``report/<stage>/...`` figures for any logger's ``log_metrics``."""
        prefix = f"report/{self.stage}"
        values: dict[str, float | None] = {f"{prefix}/student_params": float(self.student_params)}
        if self.teacher_params:
            values[f"{prefix}/teacher_params"] = float(sum(self.teacher_params.values()))
        for t in self.tasks:
            values[f"{prefix}/{t.task}/teacher_{t.metric}"] = t.teacher
            values[f"{prefix}/{t.task}/student_{t.metric}"] = t.student
            values[f"{prefix}/{t.task}/gap"] = t.gap
        values[f"{prefix}/student_latency_ms"] = self.student_latency_ms
        values[f"{prefix}/teacher_latency_ms"] = self.teacher_latency_ms
        values[f"{prefix}/speedup"] = self.speedup
        return {key: value for key, value in values.items() if value is not None}

    def to_markdown(self) -> str:
        title = {"val": "validation (end of fit)", "test": "test"}.get(self.stage, self.stage)
        lines = [f"## Distillation report — {title}", "", "| " + " | ".join(self.COLUMNS) + " |"]
        lines.append("| --- | --- | ---: | ---: | ---: |")
        for row in self.rows():
            lines.append("| " + " | ".join([row[0], row[1], *(_fmt(v) for v in row[2:])]) + " |")
        lines += ["", "| model | parameters | latency (ms / batch) |", "| --- | ---: | ---: |"]
        if len(self.teacher_params) == 1:
            lines.append(f"| teacher | {self.teacher_params_total:,} | {_fmt(self.teacher_latency_ms, 2)} |")
        elif self.teacher_params:
            lines += [f"| teacher {name} | {params:,} | |" for name, params in self.teacher_params.items()]
            lines.append(f"| teachers, all | {self.teacher_params_total:,} | {_fmt(self.teacher_latency_ms, 2)} |")
        lines.append(f"| {self.student_label} | {self.student_params:,} | {_fmt(self.student_latency_ms, 2)} |")
        lines += ["", self._footer(), ""]
        return "\n".join(lines)

    def _footer(self) -> str:
        parts = []
        if self.teacher_params:
            parts.append(f"student is {sum(self.teacher_params.values()) / max(self.student_params, 1):.1f}× smaller")
        if self.speedup is not None:
            parts.append(f"{self.speedup:.1f}× faster")
        where = f"latency: median forward of a batch of {self.batch_size} on {self.device}" if self.batch_size else ""
        return "; ".join(filter(None, ["; ".join(parts), where])) + "."


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


class DistillationReport(Callback):
    """Report teacher vs student at the end of ``fit`` and ``test`` (on by default in the CLI).

    Per task: the teacher's and the student's primary metric (``Task.primary_metric``, read from
    the logged ``<stage>/<task>/teacher_<metric>`` and ``<stage>/<task>/<metric>``) and the gap;
    parameters of the teacher(s) and the student; their inference latency on the module's device
    (median over ``latency_repeats`` forwards of one batch, after ``latency_warmup``) and the
    speed-up. Writes ``<filename>.md`` and ``<filename>.png`` into the run directory (the
    logger's versioned directory, else ``default_root_dir``) and logs the same to every logger.

    Args:
        enabled: ``False`` turns the callback off (the CLI always adds it: ``--report.enabled=false``).
        latency_batch_size: Batch size of the latency measurement (taken from the first batch seen).
        latency_repeats: Timed forwards per model; 0 skips the latency measurement.
        latency_warmup: Untimed forwards first (allocator, kernels, caches).
        filename: Stem of the files written into the run directory.
        print_table: Print a rich table to the console.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[DistillationReport(latency_repeats=10)], logger=False)
    """

    def __init__(
        self,
        enabled: bool = True,
        latency_batch_size: int = 32,
        latency_repeats: int = 20,
        latency_warmup: int = 3,
        filename: str = "report",
        print_table: bool = True,
    ) -> None:
        if latency_batch_size < 1 or latency_repeats < 0 or latency_warmup < 0:
            raise ValueError(
                "DistillationReport: latency_batch_size must be >= 1 and latency_repeats, latency_warmup >= 0 "
                f"(got {latency_batch_size}, {latency_repeats}, {latency_warmup})."
            )
        self.enabled = enabled
        self.latency_batch_size = latency_batch_size
        self.latency_repeats = latency_repeats
        self.latency_warmup = latency_warmup
        self.filename = filename
        self.print_table = print_table
        self.summaries: dict[str, DistillationSummary] = {}
        self.files: dict[str, str] = {}
        self._example: Any = None

    # --------------------------------------------------------------------------- an example batch
    def _keep_example(self, batch: Any) -> None:
        # One slice of the first batch, kept once: the latency is measured on real inputs of the run.
        if self._example is None and isinstance(batch, Mapping) and tensor_leaves(batch.get("input")):
            example = first_samples(batch["input"], self.latency_batch_size)
            self._example = apply_to_collection(example, Tensor, lambda tensor: tensor.detach().clone())

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._keep_example(batch)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._keep_example(batch)

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._keep_example(batch)

    # --------------------------------------------------------------------------- the report
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(trainer, pl_module, "test")

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> DistillationSummary | None:
        """Build, print, save and log the report of ``stage`` (``val`` or ``test``); rank zero only."""
        if not self.enabled or not trainer.is_global_zero:
            return None
        summary = self.summarise(trainer, pl_module, stage)
        self.summaries[stage] = summary
        if self.print_table:
            _print_rich(summary)
        directory = run_directory(trainer)
        os.makedirs(directory, exist_ok=True)
        markdown = os.path.join(directory, f"{self.filename}.md")
        chart = os.path.join(directory, f"{self.filename}.png")
        with open(markdown, "w") as handle:  # every stage reported so far, fit's validation first
            handle.write("\n".join(s.to_markdown() for s in self.summaries.values()))
        save_chart(list(self.summaries.values()), chart)
        self.files = {"markdown": markdown, "chart": chart}
        self._log(trainer, summary, chart)
        return summary

    def summarise(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> DistillationSummary:
        """The figures of the report, from the logged metrics and the module's networks."""
        logged = trainer.callback_metrics
        tasks = []
        for name, task in getattr(pl_module, "tasks", {}).items():
            metric = task.primary_metric
            tasks.append(
                TaskComparison(
                    task=name,
                    metric=metric,
                    teacher=_value(logged.get(f"{stage}/{name}/teacher_{metric}")),
                    student=_value(logged.get(f"{stage}/{name}/{metric}")),
                    higher_is_better=task.higher_is_better,
                )
            )
        student: nn.Module = getattr(pl_module, "model", pl_module)
        teachers = _available_teachers(pl_module)
        summary = DistillationSummary(
            stage=stage,
            tasks=tasks,
            student_params=count_parameters(student),
            teacher_params={name: count_parameters(t) for name, t in teachers.items()},
            device=str(pl_module.device),
        )
        if self._example is not None and self.latency_repeats > 0:
            example = to_device(self._example, pl_module.device)
            summary.batch_size = tensor_leaves(example)[0].shape[0]
            # The student under a key no teacher can have (teacher names are task or user names: no spaces).
            latency = measure_latencies(
                {"the student": student, **teachers},
                example,
                self.latency_repeats,
                self.latency_warmup,
                unpack=getattr(pl_module, "unpack_inputs", True),
            )
            summary.student_latency_ms = latency.pop("the student")
            summary.teacher_latency_ms = sum(latency.values()) if latency else None
        return summary

    def _log(self, trainer: L.Trainer, summary: DistillationSummary, chart: str) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(summary.scalars(), step=trainer.global_step)
            # WandbLogger (and any logger with the same API) takes the table and the chart as such.
            log_table, log_image = getattr(logger, "log_table", None), getattr(logger, "log_image", None)
            if callable(log_table):
                log_table(key=f"report/{summary.stage}/table", columns=list(summary.COLUMNS), data=summary.rows())
            if callable(log_image):
                log_image(key=f"report/{summary.stage}/chart", images=[chart])


def run_directory(trainer: L.Trainer) -> str:
    """The run's own directory: the first logger's versioned directory, else ``default_root_dir``.

    TensorBoard and CSV loggers have one (``log_dir``); for the others (W&B) it is
    ``save_dir/name/version``, where ``ModelCheckpoint`` puts the run's checkpoints too.
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    if logger.log_dir:
        return logger.log_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def measure_latency(model: nn.Module, example: Any, repeats: int = 20, warmup: int = 3, unpack: bool = True) -> float:
    """Median wall time of one inference forward of ``model`` on ``example``, in milliseconds."""
    return measure_latencies({"model": model}, example, repeats, warmup, unpack)["model"]


def measure_latencies(
    models: Mapping[str, nn.Module], example: Any, repeats: int = 20, warmup: int = 3, unpack: bool = True
) -> dict[str, float]:
    """Median wall time (ms) of one inference forward of each model on ``example`` (a Tensor or a dict of them).

    The models' forwards are interleaved within each repeat, so a burst of load on a shared
    machine slows all of them alike and their ratio (the speed-up) stays fair. Models are put in
    eval mode for the measurement (and back after); CUDA is synchronised around each forward so
    the time is the kernels', not the launch's.
    """
    modes = {name: model.training for name, model in models.items()}
    device = tensor_leaves(example)[0].device
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for model in models.values():
            model.eval()
        with torch.inference_mode():
            for repeat in range(warmup + repeats):
                for name, model in models.items():
                    if cuda:
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    call_model(model, example, unpack)
                    if cuda:
                        torch.cuda.synchronize(device)
                    if repeat >= warmup:
                        times[name].append(time.perf_counter() - start)
    finally:
        for name, model in models.items():
            model.train(modes[name])
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def save_chart(summaries: list[DistillationSummary], path: str) -> None:
    """A PNG with, per reported stage, teacher vs student per task, and the latency of each."""
    # Figure + Agg canvas directly: no pyplot, so no global backend or GUI state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.2 * len(summaries)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(summaries), 2, squeeze=False, gridspec_kw={"width_ratios": [3, 1]})
    for (metric_ax, latency_ax), summary in zip(axes, summaries, strict=True):
        names = [t.task for t in summary.tasks]
        xs = range(len(names))
        width = 0.38
        teacher = [t.teacher if t.teacher is not None else math.nan for t in summary.tasks]
        student = [t.student if t.student is not None else math.nan for t in summary.tasks]
        for offset, values, color in ((-width / 2, teacher, TEACHER_COLOR), (width / 2, student, STUDENT_COLOR)):
            bars = metric_ax.bar([x + offset for x in xs], values, width, color=color)
            metric_ax.bar_label(bars, labels=[_fmt(v, 3) if math.isfinite(v) else "" for v in values], fontsize=8)
        metric_ax.set_xticks(list(xs), [f"{t.task} ({t.metric})" + _gap_label(t) for t in summary.tasks])
        metric_ax.set_title(f"{summary.stage}: teacher (grey) vs {summary.student_label} (blue) per task")
        top = max([v for v in teacher + student if math.isfinite(v)], default=1.0)
        metric_ax.set_ylim(0, 1.15 * top)
        labels = ["teacher(s)", summary.student_label]
        params = [sum(summary.teacher_params.values()), summary.student_params]
        latency = [summary.teacher_latency_ms or 0.0, summary.student_latency_ms or 0.0]
        bars = latency_ax.bar(labels, latency, color=[TEACHER_COLOR, STUDENT_COLOR])
        latency_ax.set_ylim(0, 1.2 * max(latency + [1e-3]))
        for bar, count in zip(bars, params, strict=True):
            latency_ax.annotate(
                f"{count:,} params",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                fontsize=8,
            )
        speed = f", {summary.speedup:.1f}× faster" if summary.speedup is not None else ""
        latency_ax.set_title(f"ms / batch on {summary.device}{speed}", fontsize=9)
    figure.savefig(path, dpi=100)


TEACHER_COLOR, STUDENT_COLOR = "#8c8c8c", "#3b75af"


def _gap_label(row: TaskComparison) -> str:
    return f"\ngap {row.gap:+.3f}" if row.gap is not None else ""


def _print_rich(summary: DistillationSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Distillation report ({summary.stage})")
    for column in summary.COLUMNS:
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for row in summary.rows():
        table.add_row(row[0], row[1], *(_fmt(v) for v in row[2:]))
    console = Console()
    console.print(table)
    params = f"{summary.student_label} {summary.student_params:,} parameters"
    if summary.teacher_params:
        params = f"teacher(s) {sum(summary.teacher_params.values()):,} / {params}"
    latency = ""
    if summary.student_latency_ms is not None:
        latency = f"; {summary.student_label} {summary.student_latency_ms:.2f} ms"
        if summary.teacher_latency_ms is not None:
            latency += f", teacher(s) {summary.teacher_latency_ms:.2f} ms per batch of {summary.batch_size}"
            latency += f" on {summary.device} ({summary.speedup:.1f}× faster)"
    console.print(params + latency)


def _value(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, Tensor) else value)


def _available_teachers(pl_module: L.LightningModule) -> dict[str, nn.Module]:
    """The module's teachers if it uses them in this run (none for a plain ``MultiTaskModule``, or a student
    evaluated without its teachers)."""
    teachers = getattr(pl_module, "teachers", None)
    if teachers is None or not teachers.active:
        return {}
    return teachers.modules()
