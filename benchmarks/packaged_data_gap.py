"""Is there a teacher–student gap to distil on the data sets that ship inside packages?

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/packaged_data_gap.py [--epochs-scale 0.5] [--seeds 1 2 3]

For each of ``configs/penguins``, ``configs/abalone`` and ``configs/optdigits``, builds the teacher and the
scratch student exactly as their YAML configs say (through the CLI, ``run=False``), trains each for the
config's ``max_epochs`` (times ``--epochs-scale``), keeps the epoch with the lowest ``val/loss`` and prints
its test metrics: accuracy per classification task, MAE per regression task in the table's own units
(grams, rings). CPU, one thread; one seed by default (``--seeds`` reruns with other ``seed_everything``
values on the same data split and prints mean ± std). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mtkd.cli import main
from lightning_mtkd.models import count_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATASETS = ("penguins", "abalone", "optdigits")
ROLES = ("teacher", "scratch")


def run(dataset: str, role: str, seed: int, epochs_scale: float, workdir: str) -> dict[str, Any]:
    """Fit one config, test its best-on-val epoch: parameters, epochs, seconds and ``{task: (metric, value)}``."""
    config = CONFIGS / dataset / f"{role}.yaml"
    cli = main(["--config", str(config), "--trainer.logger=false", f"--seed_everything={seed}"], run=False)
    module, dm = cli.model, cli.datamodule
    epochs = max(1, round(cli.trainer.max_epochs * epochs_scale))
    best = ModelCheckpoint(dirpath=os.path.join(workdir, dataset, role, str(seed)), monitor="val/loss", mode="min")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        deterministic=True,
        logger=False,
        callbacks=[best],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module, dm)
    metrics = trainer.test(module, dm, ckpt_path="best", verbose=False, weights_only=True)[0]
    seconds = time.perf_counter() - started
    scores = {}
    for name, task in module.tasks.items():
        if task.kind == "regression":
            # The targets are standardised on the training rows; the MAE scales back by their std.
            scores[name] = ("MAE", metrics[f"test/{name}/mae"] * getattr(dm, "target_std", {}).get(name, 1.0))
        else:
            scores[name] = ("acc", metrics[f"test/{name}/acc"])
    return {"params": count_parameters(module.model), "epochs": epochs, "seconds": seconds, "scores": scores}


def summary(runs: list[dict[str, Any]]) -> str:
    """``task metric value`` per task: the value, or mean ± std over seeds."""
    parts = []
    for task, (metric, _) in runs[0]["scores"].items():
        values = [r["scores"][task][1] for r in runs]
        spread = f" ± {statistics.stdev(values):.3g}" if len(values) > 1 else ""
        parts.append(f"{task} {metric} {statistics.mean(values):.3g}{spread}")
    return "  ".join(parts)


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiplies each config's max_epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="seed_everything values, one run each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [
            (d, r, [run(d, r, seed, args.epochs_scale, workdir) for seed in args.seeds])
            for d in args.datasets
            for r in ROLES
        ]
    print(f"\ntorch {torch.__version__}, lightning {L.__version__}, 1 thread, seeds {args.seeds}, data split seed 0")
    print(f"{'data':<10} {'model':<8} {'params':>8} {'epochs':>6} {'time':>6}  test metrics (best val/loss epoch)")
    for dataset, role, runs in rows:
        seconds = math.ceil(sum(r["seconds"] for r in runs) / len(runs))
        print(f"{dataset:<10} {role:<8} {runs[0]['params']:>8,} {runs[0]['epochs']:>6} {seconds:>5}s  {summary(runs)}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main_()
