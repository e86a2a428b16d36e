"""Task-specific, transfer and fusion distillation against a scratch student on MultiMNIST (small data).

    PYTHONPATH=. python benchmarks/multi_teacher_strategies.py --epochs 10 --teacher-epochs 10

Trains a multi-task teacher and two single-task teachers (of different widths), then, from the same
seed, a scratch student and one student per strategy; prints test accuracy per task and wall time.
One intra-op thread (on a shared 2-core machine, two threads contend).
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from lightning_mtkd import FusionDistiller, MultiTaskModule, Task, TaskSpecificDistiller, TransferDistiller
from lightning_mtkd.data import MultiMNISTDataModule
from lightning_mtkd.models import ConvBackbone, MultiTaskNet, count_parameters

TASKS = [Task("left", num_classes=10), Task("right", num_classes=10)]


def net(widths: tuple[int, int], hidden: int, heads: tuple[str, ...] = ("left", "right"), dropout: float = 0.0):
    return MultiTaskNet(ConvBackbone(widths=widths, hidden=hidden, dropout=dropout), {h: 10 for h in heads})


def fit(module: L.LightningModule, dm: MultiMNISTDataModule, epochs: int) -> tuple[dict[str, float], float]:
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - start
    return trainer.test(module, dm, verbose=False)[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dm = MultiMNISTDataModule(num_train=5000, num_val=1000, num_test=2000, batch_size=128)

    teachers = {}
    for name, (widths, hidden, heads) in {
        "multitask": ((32, 64), 256, ("left", "right")),
        "left": ((32, 64), 256, ("left",)),
        "right": ((24, 48), 192, ("right",)),
    }.items():
        L.seed_everything(args.seed)
        module = MultiTaskModule(net(widths, hidden, heads, dropout=0.5), [t for t in TASKS if t.name in heads])
        metrics, seconds = fit(module, dm, args.teacher_epochs)
        teachers[name] = module.model.eval()
        accs = " / ".join(f"{metrics[f'test/{t}/acc']:.3f}" for t in heads)
        print(f"teacher {name:9s} {count_parameters(module.model):>7d} params  test acc {accs}  ({seconds:.0f} s)")

    def student():
        return net((8, 16), 64)

    runs = {
        "scratch": lambda: MultiTaskModule(student(), TASKS),
        "task_specific": lambda: TaskSpecificDistiller(
            student(), {"left": teachers["left"], "right": teachers["right"]}, TASKS
        ),
        "transfer": lambda: TransferDistiller(
            {"left": net((6, 12), 48, ("left",)), "right": net((6, 12), 48, ("right",))}, teachers["multitask"], TASKS
        ),
        "fusion mean": lambda: FusionDistiller(student(), dict(teachers), TASKS, fusion="mean"),
        "fusion confidence": lambda: FusionDistiller(student(), dict(teachers), TASKS, fusion="confidence"),
        "fusion learned": lambda: FusionDistiller(student(), dict(teachers), TASKS, fusion="learned"),
    }
    print(f"\n| student ({args.epochs} epochs, seed {args.seed}) | params | test left | test right | fit s |")
    print("| --- | --- | --- | --- | --- |")
    for name, build in runs.items():
        L.seed_everything(args.seed)
        module = build()
        metrics, seconds = fit(module, dm, args.epochs)
        params = count_parameters(module.model)
        left, right = metrics["test/left/acc"], metrics["test/right/acc"]
        print(f"| {name} | {params} | {left:.3f} | {right:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
