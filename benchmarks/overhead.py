"""What the library adds to a distillation step: a hand-written loop vs bare Lightning vs ``SharedDistiller``.

The same teacher, student, data, batch size and loss (per task ``(1-α)·CE + α·T²·KL``, α=0.5, T=4)
run three ways:

    a  loop        a hand-written PyTorch loop (teacher under no_grad, then the student)
    b  lightning   a minimal LightningModule with that loop body as its training_step
    c  ours        lightning_mtkd.SharedDistiller (hint off), the library's shared step (metrics, logging)

Goals: c/a ≤ 1.10 at a realistic step (≥ 20 ms) and c/b ≤ 1.03. Each run is a fresh process;
runs are interleaved (a, b, c, a, b, c, …); figures are medians. Writes benchmarks/results/overhead.md.

    python benchmarks/overhead.py                                    # the full job (20,000 composites)
    python benchmarks/overhead.py --num-train 2048 --repeats 3       # a quick look
    python benchmarks/overhead.py --precision bf16-mixed --out benchmarks/results/overhead-bf16.md
    python benchmarks/overhead.py --compile --out benchmarks/results/overhead-compile.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # this checkout's package, and _common beside this file

import _common as C  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from lightning_mtkd import SharedDistiller  # noqa: E402
from lightning_mtkd.losses.functional import soft_target_kd  # noqa: E402

ALPHA, TEMPERATURE = 0.5, 4.0
VARIANTS = ("loop", "lightning", "ours")


def kd_loss(student: dict[str, Tensor], teacher: dict[str, Tensor], targets: dict[str, Tensor]) -> Any:
    """Per task ``(1-α)·CE + α·T²·KL``: what SharedDistiller computes with the hint off."""
    return sum(
        (1 - ALPHA) * F.cross_entropy(student[t], targets[t])
        + ALPHA * soft_target_kd(student[t], teacher[t], TEMPERATURE)
        for t in C.HEADS
    )


def models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher, student = C.teacher_net(args), C.student_net(args)
    if args.compile:
        student.compile()
    return teacher, student


def run_loop(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
    teacher, student = models(args)
    teacher.to(device).requires_grad_(False)
    student.to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    loader = C.datamodule(args).train_dataloader()
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else None
    times = []
    for _ in range(args.epochs):
        C._sync()
        start = time.perf_counter()
        for batch in loader:
            inputs = batch["input"].to(device, non_blocking=True)
            targets = {t: y.to(device, non_blocking=True) for t, y in batch["targets"].items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                with torch.no_grad():
                    teacher_out = teacher(inputs)
                loss = kd_loss(student(inputs), teacher_out, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        C._sync()
        times.append(time.perf_counter() - start)
    return {"epoch_s": C.timed_epochs(times), "epochs": times}


class MinimalDistiller(L.LightningModule):
    """The loop body as a training_step, nothing else (the teacher kept out of the module tree)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.student = student
        self._teacher = [teacher.requires_grad_(False)]

    def setup(self, stage: str) -> None:
        self._teacher[0].to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = self._teacher[0](batch["input"])
        return kd_loss(self.student(batch["input"]), teacher_out, batch["targets"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.student.parameters(), lr=1e-3)


def run_lightning(args: argparse.Namespace, module: L.LightningModule) -> dict[str, Any]:
    timer = C.EpochTimer()
    C.trainer(args, [timer]).fit(module, C.datamodule(args))
    return {"epoch_s": C.timed_epochs(timer.times), "epochs": timer.times}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker == "loop":
        return run_loop(args)
    teacher, student = models(args)
    if args.worker == "lightning":
        module: L.LightningModule = MinimalDistiller(student, teacher)
    else:
        module = SharedDistiller(student, teacher, C.TASKS, temperature=TEMPERATURE, alpha=ALPHA, hint_weight=0.0)
    return run_lightning(args, module)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_job_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (module.compile())")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        C.worker_main(args, run)
        return
    argv = sys.argv[1:]
    results = C.interleave(os.path.abspath(__file__), VARIANTS, argv, args.repeats)
    steps = -(-args.num_train // args.batch_size)
    med = {v: C.median_of(results[v], "epoch_s") for v in VARIANTS}
    best = {v: C.min_of(results[v], "epoch_s") for v in VARIANTS}
    names = {"loop": "a. hand-written loop", "lightning": "b. minimal LightningModule", "ours": "c. SharedDistiller"}
    rows = []
    for v in VARIANTS:
        runs = results[v]
        errors = [r["error"] for r in runs if "error" in r]
        all_runs = ", ".join(f"{r['epoch_s']:.3f}" for r in runs if "epoch_s" in r)
        rows.append([
            names[v], f"{med[v]:.3f}", f"{1000 * med[v] / steps:.1f}", f"{med[v] / med['loop']:.3f}",
            f"{med[v] / med['lightning']:.3f}", f"{best[v]:.3f}", f"{best[v] / best['loop']:.3f}",
            f"{best[v] / best['lightning']:.3f}", f"{C.median_of(runs, 'peak_mb'):.0f}",
            all_runs + (f" (errors: {errors[0]})" if errors else ""),
        ])
    ca, cb = med["ours"] / med["loop"], med["ours"] / med["lightning"]
    step_ms = 1000 * med["loop"] / steps
    notes = (
        f"c/a = **{ca:.3f}** (goal ≤ 1.10 at a step ≥ 20 ms; this step: {step_ms:.1f} ms), "
        f"c/b = **{cb:.3f}** (goal ≤ 1.03), b/a = {med['lightning'] / med['loop']:.3f} (medians); best runs: "
        f"c/a = {best['ours'] / best['loop']:.3f}, c/b = {best['ours'] / best['lightning']:.3f}.\n\n"
        "Epoch = median of the timed epochs of one run; the table shows the median over runs and every run's "
        "figure; best = the fastest run, the least disturbed on a shared machine. Epoch times on a 2-core machine "
        "swing ±15% (shared/MEASUREMENTS.md): treat ±10% as a tie."
    )
    out = args.out or os.path.join(C.RESULTS, "overhead.md")
    header = ["variant", "epoch s (median)", "ms/step", "÷ a", "÷ b", "best s", "best ÷ a", "best ÷ b", "peak MB",
              "runs (epoch s)"]
    print(C.write_table(out, "Overhead of the shared step", C.describe_job(args), header, rows, notes))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
