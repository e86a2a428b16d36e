"""Quality: does every strategy's student beat the same student trained from scratch, on every data set?

    PYTHONPATH=. .venv/bin/python benchmarks/quality.py --data multimnist      # or: make quality
    PYTHONPATH=. .venv/bin/python benchmarks/quality.py --data optdigits --rows scratch shared shared+aug
    PYTHONPATH=. .venv/bin/python benchmarks/quality.py --summary             # quality-summary.md from the .json files

One fixed setup per data set (``lightning_mtkd.recipe.DATASETS``: MultiMNIST, the set the old defaults were
tuned on; MultiOptDigits from scikit-learn's UCI digits; the penguins and abalone tables): the teachers are
trained once and reused; every student row has the same budget, optimizer and data, 3 seeds each, and is
compared with the same architecture trained from scratch (``BASELINE``: the multi-task student, or for
transfer distillation its per-task students); the epoch with the lowest validation loss is kept and the
test split is read once (``--split val`` reports the kept epoch's validation metrics instead: choose
settings with that). Runs go to ``--workers`` processes in parallel. Writes
``benchmarks/results/quality-<data>.md``, ``.png`` and ``.json``.

A row is a strategy (``shared``, ``task-specific``, …) and optionally levers, joined by ``+``:

- ``aug``: consistent augmentation (``BatchAugment``: shifts and mixup for images, noise and mixup for tables),
  one view per batch shared by teachers and student; the teacher cache then keeps the validation split only;
- ``mix``: function matching on extra inputs: each training batch gets as many mixup blends of its own samples
  appended, with no labels, so only the distillation terms reach them (``BatchAugment(mixup_mode="append")``);
  the labelled samples stay as they are (``aug`` mixes half of them in place, dropping their labels);
- ``long``: a patient schedule, twice the epochs (Beyer et al., CVPR 2022); ``longer``: four times;
- ``cos``: the learning rate decays to zero over the run (cosine annealing) instead of staying constant;
- ``unl``: unlabelled composites joined to the training split (image sets only);
- ``search``: temperature and α chosen by ``KDSearch`` on the validation split;
- ``trust``: ``TeacherTrust`` (task-specific: the multi-task teacher is a candidate for every task; fusion);
- ``new``: the new defaults (``NEW_DEFAULTS``).

A scratch row takes ``aug`` (without mixup: a mixed sample has no label), ``long``, ``longer`` and ``cos`` too, so
a lever's gain can be told apart from what the same data and schedule would give a student without a teacher.

Columns: per-task test metric (accuracy; MAE in standardised units for regression, lower is better;
mean ± std over seeds), the mean accuracy over the classification tasks, the multi-task gain
Δm = (1/T) Σ_t ±(M_t − M_t^scratch) / M_t^scratch (Maninis, Radosavovic & Kokkinos, CVPR 2019; as in
LibMTL; the sign makes a lower error a gain) against the row's baseline, the fraction of the
teacher–baseline gap closed (the multi-task teacher's mean accuracy; not shown for the tables, which have
no real gap), parameters, single-sample CPU latency and seconds per run.
"""

from __future__ import annotations

import argparse
import glob
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
from lightning_mtkd.callbacks import KDSearch, TeacherTrust
from lightning_mtkd.models import TaskStudents, count_parameters
from lightning_mtkd.recipe import (
    DATASETS,
    datamodule,
    dataset_tasks,
    evaluate_checkpoint,
    fit_and_test,
    multitask_teacher,
    network,
    student_optimizer,
    train_or_reuse,
)
from lightning_mtkd.tasks import Task


@dataclass
class Teachers:
    """Checkpoint paths of the teachers every row may use."""

    multitask: str
    single_task: dict[str, str]  # task name → single-task teacher


#: One builder per strategy row: (teachers, config) → the LightningModule to fit. Every row gets the same student
#: architecture (transfer: per-task students of about the same total size) and `student_optimizer`; every
#: distilling row gets the same soft-target settings (`config["distill"]`: temperature and α) and otherwise runs
#: with its strategy's defaults. The levers (`LEVERS`) are applied on top by `build`.
Row = Callable[[Teachers, dict[str, Any]], MultiTaskModule]


def _tasks(config: dict[str, Any]) -> list[Task]:
    return dataset_tasks(config)


def _student(config: dict[str, Any]) -> torch.nn.Module:
    return network(config["student"], _tasks(config), config.get("in_features"))


def _distill(config: dict[str, Any]) -> dict[str, Any]:
    """What every distilling row shares: the student optimizer, the temperature and α."""
    soft_targets = {key: config["distill"][key] for key in ("temperature", "alpha")}
    return {**student_optimizer(config["student"]), **soft_targets}


def _per_task_students(config: dict[str, Any]) -> dict[str, torch.nn.Module]:
    # Per-task students of about the multi-task student's size together.
    spec = config["per_task_student"]
    return {task.name: network(spec, [task], config.get("in_features")) for task in _tasks(config)}


def _task_specific(t: Teachers, c: dict[str, Any]) -> MultiTaskModule:
    # With trust, the multi-task teacher is a candidate for every task beside the single-task teachers.
    teachers = {**t.single_task, **({"multitask": t.multitask} if c.get("trust") else {})}
    return TaskSpecificDistiller(_student(c), teachers, _tasks(c), teacher_trust=bool(c.get("trust")), **_distill(c))


def _attention(t: Teachers, c: dict[str, Any]) -> MultiTaskModule:
    if not c.get("attention_layers"):
        raise ValueError("attention distillation needs conv or attention layers; this data set's MLPs have none.")
    layers = [AttentionPair(**pair) for pair in c["attention_layers"]]
    return AttentionDistiller(_student(c), t.multitask, _tasks(c), layers=layers, **_distill(c))


ROWS: dict[str, Row] = {
    "scratch": lambda t, c: MultiTaskModule(_student(c), _tasks(c), **student_optimizer(c["student"])),
    "scratch-per-task": lambda t, c: MultiTaskModule(
        TaskStudents(_per_task_students(c)), _tasks(c), **student_optimizer(c["student"])
    ),
    "shared": lambda t, c: SharedDistiller(_student(c), t.multitask, _tasks(c), **_distill(c)),
    "task-specific": _task_specific,
    "transfer": lambda t, c: TransferDistiller(_per_task_students(c), t.multitask, _tasks(c), **_distill(c)),
    "adaptive": lambda t, c: AdaptiveDistiller(_student(c), t.multitask, _tasks(c), **_distill(c)),
    "attention": _attention,
    "fusion": lambda t, c: FusionDistiller(
        _student(c),
        {"multitask": t.multitask, **t.single_task},
        _tasks(c),
        teacher_trust=bool(c.get("trust")),
        **_distill(c),
    ),
    # The losses of the single-task KD libraries, inside the same shared step (rows as `shared`, one setting apart).
    "shared-dkd": lambda t, c: SharedDistiller(_student(c), t.multitask, _tasks(c), kd_loss="dkd", **_distill(c)),
    "shared-dist": lambda t, c: SharedDistiller(_student(c), t.multitask, _tasks(c), kd_loss="dist", **_distill(c)),
    "shared-ls": lambda t, c: SharedDistiller(_student(c), t.multitask, _tasks(c), kd_loss="ls", **_distill(c)),
    "hint-cka": lambda t, c: SharedDistiller(_student(c), t.multitask, _tasks(c), distance="cka", **_distill(c)),
    "hint-rkd": lambda t, c: SharedDistiller(_student(c), t.multitask, _tasks(c), distance="rkd", **_distill(c)),
    "hint-crd": lambda t, c: SharedDistiller(_student(c), t.multitask, _tasks(c), distance="crd", **_distill(c)),
    # Online: no trained teacher. Mutual learning with the per-task students as peers; an EMA of the student.
    "mutual": lambda t, c: MutualDistiller(_student(c), _per_task_students(c), _tasks(c), **_distill(c)),
    "self-ema": lambda t, c: SelfDistiller(_student(c), _tasks(c), **_distill(c)),
    # The same two with the online papers' weighting instead of the offline recipe's α = 0.9, T = 4: deep mutual
    # learning adds KL(peer || student) at T = 1 with the weight of the labels' loss, i.e. α = 0.5.
    "mutual-a05-t1": lambda t, c: MutualDistiller(
        _student(c), _per_task_students(c), _tasks(c), **{**_distill(c), "alpha": 0.5, "temperature": 1.0}
    ),
    "self-ema-a05-t1": lambda t, c: SelfDistiller(
        _student(c), _tasks(c), **{**_distill(c), "alpha": 0.5, "temperature": 1.0}
    ),
}

#: The levers a row may add to a strategy with ``+`` (see the module docstring).
LEVERS = ("aug", "mix", "long", "longer", "cos", "unl", "search", "trust")
#: The levers a scratch student takes too (data and schedule): a row with them is also compared with that scratch row.
SCRATCH_LEVERS = ("aug", "long", "longer", "cos")
#: The ``mix`` lever: as many mixed samples as labelled ones appended to each training batch, labelled by the
#: teachers only (``BatchAugment(mixup_mode="append")``): unlabelled inputs made from any data set's own inputs.
MIX = {"mixup": 1.0, "mixup_fraction": 1.0, "mixup_mode": "append"}
#: What ``+new`` stands for: the new defaults, chosen on the validation splits (quality-screens.md): a patient
#: schedule (four times the epochs; twice was the first choice) and teacher trust where a strategy has several
#: teachers. Consistent augmentation, appended mixup blends, cosine decay and the KD search did not hold on every
#: validation set; unlabelled data helps where a data set has some.
NEW_DEFAULTS: tuple[str, ...] = ("longer", "trust")
#: The six strategies.
STRATEGIES = ("shared", "task-specific", "transfer", "adaptive", "attention", "fusion")
#: KDSearch's candidates in the ``search`` lever.
SEARCH = {"temperatures": [1.0, 2.0, 4.0], "alphas": [0.5, 0.9], "epochs": 2}


def parse_row(row: str) -> tuple[str, tuple[str, ...]]:
    """``"shared+aug+long"`` → ``("shared", ("aug", "long"))``; ``new`` expands to :data:`NEW_DEFAULTS`."""
    base, *levers = row.split("+")
    if base not in ROWS:
        raise ValueError(f"unknown row {row!r}: {base!r} is not one of {list(ROWS)}.")
    expanded: list[str] = []
    for lever in levers:
        if lever not in (*LEVERS, "new"):
            raise ValueError(f"unknown lever {lever!r} in row {row!r}; the levers are {[*LEVERS, 'new']}.")
        expanded += list(NEW_DEFAULTS) if lever == "new" else [lever]
    return base, tuple(dict.fromkeys(expanded))


def row_choices() -> list[str]:
    return [*ROWS, *(f"{s}+{lever}" for s in (*STRATEGIES, "scratch") for lever in (*LEVERS, "new"))]


#: Rows that change one setting of `shared` (plain soft targets, its default hint): also compared with it.
VERSUS_SHARED = (
    "shared-dkd",
    "shared-dist",
    "shared-ls",
    "hint-cka",
    "hint-rkd",
    "hint-crd",
    "mutual",
    "self-ema",
    "mutual-a05-t1",
    "self-ema-a05-t1",
)
#: The rows `make quality` runs by default: the six strategies with the recipe alone and with the new defaults
#: (``+new``), and the scratch students each is compared with; the others are asked for with --rows.
DEFAULT_ROWS = [
    "scratch",
    "scratch-per-task",
    *STRATEGIES,
    "scratch+new",
    "scratch-per-task+new",
    *(f"{strategy}+new" for strategy in STRATEGIES),
]


#: Scratch rows: the baselines, trained on labels alone.
SCRATCH_ROWS = ("scratch", "scratch-per-task")
#: A row whose student is not the shared multi-task net is compared with the same architecture from scratch.
BASELINE = {"transfer": "scratch-per-task"}


def default_rows(config: dict[str, Any]) -> list[str]:
    """:data:`DEFAULT_ROWS` that the data set can run: the tables' MLPs have no layers for attention distillation."""
    return [row for row in DEFAULT_ROWS if config.get("attention_layers") or parse_row(row)[0] != "attention"]


def baseline_of(row: str) -> str:
    """The scratch row a row is compared with: the same student architecture, no levers."""
    return BASELINE.get(parse_row(row)[0], "scratch")


def is_scratch(row: str) -> bool:
    return parse_row(row)[0] in SCRATCH_ROWS


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
    task = next(t for t in _tasks(config) if t.name == name)
    make = lambda: MultiTaskModule(network(config["teacher"], [task], config.get("in_features")), [task])  # noqa: E731
    return train_or_reuse(f"teacher_{name}", make, config["teacher"], dm, config["data"], root, False)


def build(row: str, config: dict[str, Any], teachers: Teachers) -> tuple[MultiTaskModule, dict[str, Any]]:
    """The row's module and how to fit it: ``{"epochs", "augment", "unlabelled", "callbacks"}``."""
    base, levers = parse_row(row)
    scratch = base in SCRATCH_ROWS
    if scratch and "new" in row.split("+"):  # a scratch student takes the new defaults' schedule only
        levers = tuple(lever for lever in levers if lever in SCRATCH_LEVERS)
    if scratch and ({"search", "trust", "unl", "mix"} & set(levers)):
        raise ValueError(f"row {row!r}: a scratch student has no teacher to search, trust or label for it.")
    if {"aug", "mix"} <= set(levers):
        raise ValueError(f"row {row!r}: take one of aug and mix (both set the batch augmentation).")
    if "trust" in levers and base not in ("task-specific", "fusion"):
        if "trust" in row.split("+"):
            raise ValueError(f"row {row!r}: teacher trust chooses among several teachers (task-specific, fusion only).")
        levers = tuple(lever for lever in levers if lever != "trust")  # +new: trust where there is a choice
    epochs = config["student"]["epochs"] * (4 if "longer" in levers else 2 if "long" in levers else 1)
    if "cos" in levers:  # the learning rate decays over the run's own epochs
        config = {**config, "student": {**config["student"], "epochs": epochs, "schedule": "cosine"}}
    module = ROWS[base](teachers, {**config, "trust": "trust" in levers})
    callbacks: list[Any] = []
    if "search" in levers:
        callbacks.append(KDSearch(**SEARCH))
    if "trust" in levers:
        callbacks.append(TeacherTrust())
    lever_config = config.get("levers", {})
    if "unl" in levers and "unlabelled" not in lever_config:
        raise ValueError(
            f"row {row!r}: data set {config['data'].get('dataset', 'multimnist')!r} has no unlabelled data."
        )
    augment = None
    if "mix" in levers:
        augment = MIX
    elif "aug" in levers:
        augment = lever_config["scratch_augment" if scratch else "augment"]
    return module, {
        "epochs": epochs,
        "augment": augment,
        "unlabelled": lever_config["unlabelled"] if "unl" in levers else None,
        "callbacks": callbacks,
    }


def fit_student(
    row: str, seed: int, config: dict[str, Any], teachers: Teachers, workdir: str, split: str = "test"
) -> dict[str, Any]:
    """One student run: seed, build the row's module, fit, keep the best validation epoch, evaluate once.

    A distiller gets an in-memory :class:`TeacherCache` (``fit_and_test``'s default; the validation split
    only when the batches are augmented). Returns the per-task metric, the seconds the run took and what
    the row's callbacks chose (KDSearch's temperature and α, TeacherTrust's teachers).
    """
    L.seed_everything(seed, workers=True)
    module, how = build(row, config, teachers)
    dm = datamodule(config, how["augment"], how["unlabelled"])
    started = time.perf_counter()
    metrics = fit_and_test(
        module, dm, how["epochs"], progress=False, workdir=workdir, callbacks=how["callbacks"], split=split
    )
    seconds = time.perf_counter() - started
    chosen: dict[str, Any] = {}
    for callback in how["callbacks"]:
        if isinstance(callback, KDSearch):
            chosen.update(callback.chosen)
        if isinstance(callback, TeacherTrust):
            chosen["trust"] = callback.choice
    scores = {t.name: metrics[f"{split}/{t.name}/{t.primary_metric}"] for t in _tasks(config)}
    return {"acc": scores, "seconds": seconds, "chosen": chosen}


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


def run(
    config: dict[str, Any], seeds: list[int], rows: list[str], root: str, workers: int = 1, split: str = "test"
) -> dict[str, Any]:
    started = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    tasks = _tasks(config)
    dm = datamodule(config)
    config = {**config, "in_features": getattr(dm, "in_features", None)}
    names = ["multitask", *[t.name for t in tasks]]
    threads = teacher_threads(len(names), workers)
    paths = _map(train_teacher, [(name, config, root, n) for name, n in zip(names, threads, strict=True)], workers)
    teachers = Teachers(paths[0], dict(zip(names[1:], paths[1:], strict=True)))
    teachers_seconds = time.perf_counter() - started

    def evaluate(path: str) -> tuple[MultiTaskModule, dict[str, float]]:
        if split == "test":
            return evaluate_checkpoint(path, dm)
        module = MultiTaskModule.load_from_checkpoint(path, weights_only=True)
        return module, L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
            module, dm, verbose=False
        )[0]

    teacher, teacher_metrics = evaluate(teachers.multitask)
    example = dm.splits["test"][0]["input"].unsqueeze(0)
    single_task = {
        task.name: evaluate(teachers.single_task[task.name])[1][f"{split}/{task.name}/{task.primary_metric}"]
        for task in tasks
    }
    results: dict[str, Any] = {
        "teacher": {
            "acc": {t.name: [teacher_metrics[f"{split}/{t.name}/{t.primary_metric}"]] for t in tasks},
            "params": count_parameters(teacher.model),
            "latency_ms": latency_ms(teacher.model, example),
        }
    }
    jobs = [(row, seed) for row in rows for seed in seeds]
    student_jobs = [
        (row, seed, config, teachers, os.path.join(root, "runs", f"{row}-{seed}"), split) for row, seed in jobs
    ]
    runs = _map(fit_student, student_jobs, workers)
    for (row, seed), result in zip(jobs, runs, strict=True):
        chosen = f" chose {result['chosen']}" if result["chosen"] else ""
        print(
            f"{row} seed {seed}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in result["acc"].items())
            + f" ({result['seconds']:.0f} s){chosen}",
            flush=True,
        )
    for row in rows:
        per_seed = [result for (r, _), result in zip(jobs, runs, strict=True) if r == row]
        model = build(row, config, teachers)[0].model  # same architecture: parameters and latency
        results[row] = {
            "acc": {t.name: [result["acc"][t.name] for result in per_seed] for t in tasks},
            "params": count_parameters(model),
            "latency_ms": latency_ms(model, example),
            "seconds": statistics.fmean(result["seconds"] for result in per_seed),
            "chosen": [result["chosen"] for result in per_seed],
        }
    return {
        "data": config["data"].get("dataset", "multimnist"),
        "split": split,
        "higher_is_better": {t.name: t.higher_is_better for t in tasks},
        "rows": results,
        "single_task_teachers": single_task,
        "seconds": time.perf_counter() - started,
        "teachers_seconds": teachers_seconds,
        "workers": workers,
        "seeds": seeds,
        "config": {k: v for k, v in config.items() if k != "in_features"},
    }


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per row: means and stds, and against its scratch baseline (:func:`baseline_of`): Δm, the share of the
    teacher–scratch gap closed, and whether it beats that baseline by more than either's seed std.

    The mean is over the classification tasks (accuracy); Δm is over every task, an error's fall counted as a gain.
    A row with levers is also compared with the scratch row given the same data levers (``vs_scratch_same``).
    """
    rows = result["rows"]
    first = next(iter(rows.values()))["acc"]
    higher = result.get("higher_is_better", dict.fromkeys(first, True))
    classified = [t for t in first if higher[t]] or list(first)

    def mean_over_tasks(acc: dict[str, list[float]]) -> list[float]:
        return [statistics.fmean(values) for values in zip(*(acc[t] for t in classified), strict=True)]

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
            "seconds": row.get("seconds"),
            "chosen": row.get("chosen", []),
        }
        # A scratch row is a baseline; with data levers it is compared with the plain one.
        plain_scratch = name == "teacher" or (is_scratch(name) and "+" not in name)
        baseline_name = None if plain_scratch else baseline_of(name)
        baseline = rows.get(baseline_name) if baseline_name else None
        if name == "teacher" or baseline is None or name == baseline_name:
            summary.append(entry)
            continue
        baseline_task = {t: statistics.fmean(v) for t, v in baseline["acc"].items()}
        baseline_seeds = mean_over_tasks(baseline["acc"])
        baseline_mean = statistics.fmean(baseline_seeds)
        entry["baseline"] = baseline_name
        entry["delta_m"] = 100 * statistics.fmean(
            (1 if higher[t] else -1) * (entry["task"][t][0] - baseline_task[t]) / abs(baseline_task[t])
            for t in baseline_task
        )
        closed = _share_of_gap(entry["mean"][0], baseline_mean, teacher_mean)
        if closed is not None:
            entry["gap_closed"] = closed
        entry["beats_scratch"] = entry["mean"][0] - baseline_mean > max(entry["mean"][1], _std(baseline_seeds))
        same = _scratch_with_same_data(name)
        if same and same in rows and same != baseline_name:
            # The fair comparison for a row with data levers: the scratch student given the same data and epochs.
            same_seeds = mean_over_tasks(rows[same]["acc"])
            same_mean = statistics.fmean(same_seeds)
            same_task = {t: statistics.fmean(v) for t, v in rows[same]["acc"].items()}
            entry["vs_scratch_same"] = (same, entry["mean"][0] - same_mean)
            entry["same"] = {
                "row": same,
                "delta": entry["mean"][0] - same_mean,
                "delta_m": 100
                * statistics.fmean(
                    (1 if higher[t] else -1) * (entry["task"][t][0] - same_task[t]) / abs(same_task[t])
                    for t in same_task
                ),
                "gap_closed": _share_of_gap(entry["mean"][0], same_mean, teacher_mean),
                "beats": entry["mean"][0] - same_mean > max(entry["mean"][1], _std(same_seeds)),
            }
        if name in VERSUS_SHARED and "shared" in rows:
            shared_seeds = mean_over_tasks(rows["shared"]["acc"])
            entry["vs_shared"] = entry["mean"][0] - statistics.fmean(shared_seeds)
            entry["beats_shared"] = entry["vs_shared"] > max(entry["mean"][1], _std(shared_seeds))
        summary.append(entry)
    return summary


def _share_of_gap(student: float, scratch: float, teacher: float) -> float | None:
    """(student − scratch) / (teacher − scratch); ``None`` when the teacher is no better than scratch: no gap."""
    return (student - scratch) / (teacher - scratch) if teacher != scratch else None


def _scratch_with_same_data(row: str) -> str | None:
    """The scratch row with the same data and schedule levers (:data:`SCRATCH_LEVERS`) as ``row``, if it has any.

    Spelled as ``row`` spells them: ``fusion+new+cos`` → ``scratch+new+cos``.
    """
    if "+" not in row or is_scratch(row):
        return None
    base, levers = parse_row(row)
    if not set(SCRATCH_LEVERS) & set(levers):
        return None
    written = [part for part in row.split("+")[1:] if part == "new" or part in SCRATCH_LEVERS]
    return "+".join([BASELINE.get(base, "scratch"), *written])


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(summary: list[dict[str, Any]], result: dict[str, Any]) -> str:
    higher = result.get("higher_is_better") or dict.fromkeys(summary[0]["task"], True)
    tasks = list(higher)
    gap = result.get("data", "multimnist") not in NO_GAP
    header = [
        "row",
        *[f"{t} {'%' if higher[t] else 'MAE'}" for t in tasks],
        "mean %",
        "Δm %",
        *(["gap closed"] if gap else []),
        "vs",
        "beats it",
        "vs scratch, same data",
        "vs shared",
        "params",
        "latency ms",
        "s / run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for e in summary:
        cells = [e["row"]]
        for t in tasks:
            scale = 100 if higher[t] else 1
            digits = 2 if higher[t] else 4
            cells.append(f"{scale * e['task'][t][0]:.{digits}f} ± {scale * e['task'][t][1]:.{digits}f}")
        cells.append(f"{100 * e['mean'][0]:.2f} ± {100 * e['mean'][1]:.2f}")
        cells.append(f"{e['delta_m']:+.2f}" if "delta_m" in e else "")
        if gap:
            cells.append(f"{100 * e['gap_closed']:.0f}%" if "gap_closed" in e else "")
        cells.append(e.get("baseline", ""))
        cells.append(("yes" if e["beats_scratch"] else "**no**") if "beats_scratch" in e else "")
        if "vs_scratch_same" in e:
            same, delta = e["vs_scratch_same"]
            cells.append(f"{100 * delta:+.2f} ({same})")
        else:
            cells.append("")
        if "vs_shared" in e:  # the change in mean accuracy over `shared`, and whether it exceeds the seed std
            cells.append(f"{100 * e['vs_shared']:+.2f}" + (" (beats it)" if e["beats_shared"] else ""))
        else:
            cells.append("")
        seconds = e.get("seconds")
        cells += [f"{e['params']:,}", f"{e['latency_ms']:.3f}", f"{seconds:.0f}" if seconds else ""]
        lines.append("| " + " | ".join(cells) + " |")
    config = result["config"]
    single_task = ", ".join(
        f"{task} {100 * v:.2f} %" if higher[task] else f"{task} MAE {v:.4f}"
        for task, v in result["single_task_teachers"].items()
    )
    choices = [
        f"{e['row']}: " + "; ".join(json.dumps(c, sort_keys=True) for c in e["chosen"])
        for e in summary
        if any(e.get("chosen") or [])
    ]
    split = result.get("split", "test")
    lines += [
        "",
        f"Metrics on the {split} split. Teacher: the multi-task teacher. Single-task teachers (task-specific and "
        f"fusion): {single_task}.",
        *(["Chosen per seed: " + " · ".join(choices) + "."] if choices else []),
        f"Seeds {result['seeds']}; student {config['student']}; teacher {config['teacher']}; data {config['data']}.",
        f"Wall time {result['seconds']:.0f} s ({result['teachers_seconds']:.0f} s of it training or loading the "
        f"teachers) on {os.cpu_count()} CPU cores, {result['workers']} worker process(es), torch {torch.__version__}.",
    ]
    return "\n".join(lines) + "\n"


#: Data sets without a real teacher–student gap (benchmarks/packaged_data_gap.py): no "gap closed" column.
NO_GAP = ("penguins", "abalone")


def chart(
    summary: list[dict[str, Any]], path: str, title: str = "MultiMNIST", higher: dict[str, bool] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in summary[0]["task"] if (higher or {}).get(t, True)]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(summary), 3.6))
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        xs = [j + (i - (len(tasks) - 1) / 2) * width for j in range(len(summary))]
        means = [100 * e["task"][task][0] for e in summary]
        stds = [100 * e["task"][task][1] for e in summary]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=task)
    ax.set_xticks(range(len(summary)), [e["row"] for e in summary], rotation=30, ha="right")
    lows = [100 * min(e["task"][t][0] for t in tasks) for e in summary]
    ax.set_ylim(max(0.0, min(lows) - 3), 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}: students by strategy and lever (mean ± std over seeds)")
    ax.legend(loc="upper right", ncols=len(tasks))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(out: str, names: list[str]) -> str:
    """``quality-summary.md``: per data set and row, Δ mean accuracy (points) and gap closed against scratch,
    from the ``quality-<data>.json`` files in ``out`` and the rows of any ``quality-<data>-<more>.json``."""
    results = {}
    for name in names:
        # The test-split table if there is one, else the validation screen (screens/quality-<data>-val.json).
        for path in (
            os.path.join(out, f"quality-{name}.json"),
            os.path.join(out, "screens", f"quality-{name}-val.json"),
        ):
            if os.path.exists(path):
                with open(path) as f:
                    results[name] = json.load(f)
                break
        # Rows run later into quality-<data>-<more>.json (e.g. -mix) join their data set's column.
        for path in sorted(glob.glob(os.path.join(out, f"quality-{name}-*.json"))) if name in results else []:
            with open(path) as f:
                more = json.load(f)
            for row, values in more["rows"].items():
                results[name]["rows"].setdefault(row, values)
    if not results:
        raise FileNotFoundError(f"no quality-<data>.json in {out}; run benchmarks/quality.py --data NAME first.")
    rows: list[str] = []
    for result in results.values():
        rows += [r for r in result["rows"] if r not in rows and r != "teacher"]
    header = ["row", *[f"{n} ({r.get('split', 'test')}, {len(r['seeds'])} seed(s))" for n, r in results.items()]]
    lines = [
        "# Quality across data sets (benchmarks/quality.py --summary)",
        "",
        "Per data set: Δ mean accuracy against the row's scratch baseline in points (Δm % for the tables, whose "
        "regression tasks count too), the share of the teacher–scratch gap closed (image sets only: the tables "
        "have no real gap, there distillation must only not hurt), and ✓ where it beats scratch by more than the "
        "seed std. † marks a row with data or schedule levers ("
        + ", ".join(f"`{lever}`" for lever in SCRATCH_LEVERS)
        + "; `+new` has "
        + ", ".join(f"`{lever}`" for lever in NEW_DEFAULTS if lever in SCRATCH_LEVERS)
        + "), compared with the scratch student given the same data and epochs (`scratch+new`, "
        "`scratch-per-task+new`) rather than the plain one.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    summaries = {name: {e["row"]: e for e in summarise(result)} for name, result in results.items()}
    for row in rows:
        cells = [row]
        for name, result in results.items():
            e = summaries[name].get(row)
            if e is None:
                cells.append("")
            elif "delta_m" not in e:
                cells.append(f"{100 * e['mean'][0]:.2f} %" if name not in NO_GAP else "baseline")
            elif "same" in e:  # against the scratch student with the same data levers (†)
                same = e["same"]
                if name in NO_GAP:
                    cells.append(f"Δm {same['delta_m']:+.2f} %†" + (" ✓" if same["beats"] else ""))
                else:
                    closed = f" ({100 * same['gap_closed']:.0f}%)" if same["gap_closed"] is not None else ""
                    cells.append(f"{100 * same['delta']:+.2f}{closed}†" + (" ✓" if same["beats"] else ""))
            elif name in NO_GAP:
                cells.append(f"Δm {e['delta_m']:+.2f} %" + (" ✓" if e["beats_scratch"] else ""))
            else:
                baseline = statistics.fmean(
                    statistics.fmean(v) for t, v in result["rows"][e["baseline"]]["acc"].items()
                )
                delta = 100 * (e["mean"][0] - baseline)
                closed = f" ({100 * e['gap_closed']:.0f}%)" if "gap_closed" in e else ""
                cells.append(f"{delta:+.2f}{closed}" + (" ✓" if e["beats_scratch"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    teachers = []
    for name, result in results.items():
        s = {e["row"]: e for e in summarise(result)}
        scratch = s.get("scratch")
        teachers.append(
            f"{name}: teacher {100 * s['teacher']['mean'][0]:.2f} %"
            + (f", scratch {100 * scratch['mean'][0]:.2f} ± {100 * scratch['mean'][1]:.2f} %" if scratch else "")
            + f" (mean accuracy over the classification tasks, {len(result['seeds'])} seed(s))"
        )
    lines += ["", *[f"- {t}" for t in teachers]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Every strategy's student against the scratch student.")
    parser.add_argument("--data", default="multimnist", choices=list(DATASETS), help="the data set (recipe.DATASETS)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--rows", nargs="+", help=f"rows: {', '.join(ROWS)}, each +levers (default: DEFAULT_ROWS the data set can run)"
    )
    parser.add_argument("--name", help="the results files' stem (default quality-<data>): <out>/<name>.md, .png, .json")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="report test or validation metrics")
    parser.add_argument("--epochs", type=int, help="student epochs (default: the data set's)")
    parser.add_argument("--teacher-epochs", type=int, help="teacher epochs (default: the data set's)")
    parser.add_argument("--num-train", type=int, help="training composites (image sets; default: the data set's)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one process each (1: in-process)")
    parser.add_argument("--root", default=".cache/quality", help="teacher checkpoints are reused from <root>/<data>")
    parser.add_argument("--out", default="benchmarks/results", help="where the results files go")
    parser.add_argument("--summary", action="store_true", help="only write quality-summary.md from the .json files")
    args = parser.parse_args(argv)
    if args.summary:
        table = summary_table(args.out, list(DATASETS))
        with open(os.path.join(args.out, "quality-summary.md"), "w") as f:
            f.write(table)
        print(table)
        return {"summary_table": table}
    config = json.loads(json.dumps(DATASETS[args.data]))
    if args.rows is None:
        args.rows = default_rows(config)
    for row in args.rows:
        parse_row(row)  # unknown strategies and levers fail here, before any training
    if args.epochs:
        config["student"]["epochs"] = args.epochs
    if args.teacher_epochs:
        config["teacher"]["epochs"] = args.teacher_epochs
    if args.num_train:
        config["data"].update(num_train=args.num_train, num_val=max(64, args.num_train // 5))
        config["data"]["num_test"] = config["data"]["num_val"]
        if "unlabelled" in config.get("levers", {}):
            config["levers"]["unlabelled"]["num_unlabelled"] = args.num_train
    for row in [*args.rows]:
        same_data = _scratch_with_same_data(row)
        needed = [baseline_of(row), *([same_data] if same_data else [])] + (["shared"] if row in VERSUS_SHARED else [])
        args.rows[:0] = [name for name in needed if name not in args.rows]
    root = os.path.join(args.root, args.data)
    result = run(config, args.seeds, args.rows, root, args.workers, args.split)
    os.makedirs(args.out, exist_ok=True)
    name = args.name or f"quality-{args.data}"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:  # first: the runs outlive a reporting error
        json.dump(result, f, indent=1, default=str)
    summary = summarise(result)
    table = markdown(summary, result)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(f"# Quality benchmark: {args.data} (benchmarks/quality.py --data {args.data})\n\n" + table)
    chart(summary, os.path.join(args.out, f"{name}.png"), args.data, result["higher_is_better"])
    print(table)
    return {"summary": summary, "result": result}


if __name__ == "__main__":
    main()
