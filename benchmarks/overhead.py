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

``--tasks 1 2 14 40`` measures instead how the per-step cost grows with the number of tasks, on a step
where bookkeeping is all there is to see: a tiny MLP (103 → 16, the teacher 103 → 64), one binary head
per task, batch 64, one thread. Per task count, five variants:

    loop       hand-written loop: teacher, student, per task (1-α)·CE + α·T²·KL, and the same metrics
               (per-task accuracy, per-task CE and KD epoch means) accumulated without a host sync
    lightning  that loop body as a minimal LightningModule (no metrics, no logging)
    ours       SharedDistiller (hint off)
    mtm        MultiTaskModule (labels only), the issue's measurement
    mtm-bare   a minimal LightningModule with MultiTaskModule's loss and nothing else

Bookkeeping = what ``_update_metrics`` and ``_log_terms`` take in a step, timed inside ``mtm`` (and
``ours``); also mtm − mtm-bare, which includes what Lightning does with it at epoch end. Goals:
bookkeeping at 40 tasks ≤ 1.5 × at 1 task; ours ≤ 1.3 × loop at 40 tasks. Writes
benchmarks/results/overhead-tasks.md.

    python benchmarks/overhead.py --tasks 1 2 14 40                  # ~10 minutes on two cores
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

from lightning_mtkd import MultiTaskModule, SharedDistiller, Task  # noqa: E402
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset  # noqa: E402
from lightning_mtkd.losses.functional import soft_target_kd  # noqa: E402
from lightning_mtkd.models import MLPBackbone, MultiTaskNet  # noqa: E402

ALPHA, TEMPERATURE = 0.5, 4.0
VARIANTS = ("loop", "lightning", "ours")
SWEEP_VARIANTS = ("loop", "lightning", "ours", "mtm", "mtm-bare")
TINY_FEATURES, TINY_STUDENT, TINY_TEACHER = 103, 16, 64


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


# ---------------------------------------------------------------------------------- the task-count sweep
def tiny_tasks(count: int) -> list[Task]:
    return [Task(f"t{i}", num_classes=2) for i in range(count)]


def tiny_net(count: int, width: int, seed: int) -> MultiTaskNet:
    torch.manual_seed(seed)
    return MultiTaskNet(MLPBackbone(TINY_FEATURES, hidden=(width,)), {f"t{i}": 2 for i in range(count)})


def tiny_datamodule(args: argparse.Namespace, count: int) -> MultiTaskDataModule:
    n = args.tiny_batch * args.tiny_steps
    generator = torch.Generator().manual_seed(0)
    targets = {f"t{i}": torch.randint(0, 2, (n,), generator=generator) for i in range(count)}
    data = MultiTaskDataset(torch.randn(n, TINY_FEATURES, generator=generator), targets)
    return MultiTaskDataModule(data, data, batch_size=args.tiny_batch, seed=0)


def tiny_losses(student: dict[str, Tensor], teacher: dict[str, Tensor] | None, targets: dict[str, Tensor]) -> tuple:
    """Per task ``(1-α)·CE + α·T²·KL`` (missing labels ignored): the total and the per-task CE and KD terms."""
    ce = [F.cross_entropy(student[t], targets[t], ignore_index=-100) for t in student]
    kd = [soft_target_kd(student[t], teacher[t], TEMPERATURE) for t in student] if teacher is not None else []
    return sum((1 - ALPHA) * c + ALPHA * k for c, k in zip(ce, kd, strict=True)), ce, kd


class SweepMetrics:
    """What a careful hand-written loop keeps: per-task accuracy counts and CE / KD sums, on the device."""

    def __init__(self, count: int) -> None:
        self.correct = torch.zeros(count, dtype=torch.long)
        self.seen = torch.zeros((), dtype=torch.long)
        self.terms = torch.zeros(2 * count, dtype=torch.float64)
        self.weight = 0

    @torch.no_grad()
    def update(self, student: dict[str, Tensor], targets: dict[str, Tensor], ce: list, kd: list) -> None:
        logits, labels = torch.stack(list(student.values())), torch.stack([targets[t] for t in student])
        self.correct += (logits.argmax(-1) == labels).sum(1)
        self.seen += labels.shape[1]
        size = labels.shape[1]
        self.terms += torch.stack([*ce, *kd]).double().mul(size)
        self.weight += size

    def epoch_end(self) -> dict[str, Tensor]:
        result = {"acc": self.correct / self.seen, "terms": self.terms / self.weight}
        self.correct.zero_(), self.seen.zero_(), self.terms.zero_()
        self.weight = 0
        return result


def run_sweep_loop(args: argparse.Namespace, count: int) -> dict[str, Any]:
    teacher = tiny_net(count, TINY_TEACHER, 1).eval().requires_grad_(False)
    student = tiny_net(count, TINY_STUDENT, 2)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    loader = tiny_datamodule(args, count).train_dataloader()
    metrics = SweepMetrics(count)
    times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        for batch in loader:
            with torch.no_grad():
                teacher_out = teacher(batch["input"])
            student_out = student(batch["input"])
            loss, ce, kd = tiny_losses(student_out, teacher_out, batch["targets"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            metrics.update(student_out, batch["targets"], ce, kd)
        metrics.epoch_end()
        times.append(time.perf_counter() - start)
    return {"epoch_s": C.timed_epochs(times), "epochs": times}


class MinimalSweepModule(L.LightningModule):
    """A loop body as a training_step, no metrics, no logging: the distillation loss of the loop, or (no
    teacher) MultiTaskModule's own loss maths — ``Task.supervised_loss`` summed with the task weights."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None, tasks: list[Task]) -> None:
        super().__init__()
        self.student = student
        self._teacher = [teacher] if teacher is not None else []
        self._tasks = tasks

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        outputs, targets = self.student(batch["input"]), batch["targets"]
        if not self._teacher:
            return sum(t.weight * t.supervised_loss(outputs[t.name], targets[t.name]) for t in self._tasks)
        with torch.no_grad():
            teacher_out = self._teacher[0](batch["input"])
        return tiny_losses(outputs, teacher_out, targets)[0]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.student.parameters(), lr=1e-3)


class BookkeepingTimer(L.Callback):
    """Wall time of a module's bookkeeping: inside ``_update_metrics`` and ``_log_terms`` on the first step of an
    epoch (which hands Lightning the per-task keys) and on the others, and in the per-key views Lightning computes
    and resets at epoch end (this library's; absent from older versions)."""

    def __init__(self, module: L.LightningModule) -> None:
        self.first = self.steady = self.epoch_end = 0.0
        self.steps = self.epochs = 0
        self._first_step = False
        for name in ("_update_metrics", "_log_terms"):
            setattr(module, name, self._timed(getattr(module, name)))
        try:
            from lightning_mtkd.bookkeeping import TaskMetrics, TaskMetricView, TermView
        except ImportError:
            return
        for cls, name in ((TaskMetricView, "compute"), (TermView, "compute"), (TaskMetrics, "_reset_from_view")):
            setattr(cls, name, self._timed_epoch_end(getattr(cls, name)))

    def _timed(self, method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                if self._first_step:
                    self.first += elapsed
                else:
                    self.steady += elapsed

        return timed

    def _timed_epoch_end(self, function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.epoch_end += time.perf_counter() - start

        return timed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:  # the timed epochs only
            self.first = self.steady = self.epoch_end = 0.0
            self.steps = self.epochs = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._first_step = idx == 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.steps += not self._first_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs = trainer.current_epoch - 1


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    variant, _, count_text = args.worker.partition(":")
    count = int(count_text)
    if variant == "loop":
        return run_sweep_loop(args, count)
    tasks = tiny_tasks(count)
    student = tiny_net(count, TINY_STUDENT, 2)
    teacher = tiny_net(count, TINY_TEACHER, 1).eval()
    module: L.LightningModule
    if variant == "lightning":
        module = MinimalSweepModule(student, teacher.requires_grad_(False), tasks)
    elif variant == "mtm-bare":
        module = MinimalSweepModule(student, None, tasks)
    elif variant == "mtm":
        module = MultiTaskModule(student, tasks)
    else:
        module = SharedDistiller(student, teacher, tasks, temperature=TEMPERATURE, alpha=ALPHA, hint_weight=0.0)
    timer = C.EpochTimer()
    callbacks: list[L.Callback] = [timer]
    bookkeeping = BookkeepingTimer(module) if variant in ("mtm", "ours") else None
    if bookkeeping is not None:
        callbacks.append(bookkeeping)
    C.trainer(args, callbacks).fit(module, tiny_datamodule(args, count))
    result: dict[str, Any] = {"epoch_s": C.timed_epochs(timer.times), "epochs": timer.times}
    if bookkeeping is not None:
        epochs = args.epochs - 1
        result["steady_ms"] = 1000 * bookkeeping.steady / bookkeeping.steps
        result["per_epoch_ms"] = 1000 * (bookkeeping.first + bookkeeping.epoch_end) / epochs
        result["first_ms"] = 1000 * bookkeeping.first / epochs  # the first step's whole bookkeeping
    return result


def sweep_main(args: argparse.Namespace, argv: list[str]) -> None:
    variants = [f"{v}:{n}" for n in args.tasks for v in SWEEP_VARIANTS if v in args.variants]
    results = C.interleave(os.path.abspath(__file__), variants, argv, args.repeats)
    steps = args.tiny_steps

    def step_ms(variant: str, count: int) -> float:
        return 1000 * C.median_of(results.get(f"{variant}:{count}", []), "epoch_s") / steps

    def book(count: int, key: str) -> float:
        return C.median_of(results.get(f"mtm:{count}", []), key)

    def amortised(count: int) -> float:
        return book(count, "steady_ms") + (book(count, "per_epoch_ms") - book(count, "steady_ms")) / steps

    rows, first, last = [], args.tasks[0], args.tasks[-1]
    for n in args.tasks:
        rows.append(
            [
                str(n),
                f"{step_ms('loop', n):.2f}",
                f"{step_ms('lightning', n):.2f}",
                f"{step_ms('ours', n):.2f}",
                f"{step_ms('ours', n) / step_ms('loop', n):.2f}",
                f"{step_ms('mtm-bare', n):.2f}",
                f"{step_ms('mtm', n):.2f}",
                f"{step_ms('mtm', n) - step_ms('mtm-bare', n):.2f}",
                f"{book(n, 'steady_ms'):.3f}",
                f"{book(n, 'steady_ms') / book(first, 'steady_ms'):.2f}",
                f"{book(n, 'per_epoch_ms'):.1f}",
                f"{amortised(n):.3f}",
                f"{amortised(n) / amortised(first):.2f}",
            ]
        )
    steady = book(last, "steady_ms") / book(first, "steady_ms")
    versus_loop = step_ms("ours", last) / step_ms("loop", last)
    errors = sorted({r["error"] for runs in results.values() for r in runs if "error" in r})
    notes = (
        f"- Bookkeeping per step at {last} tasks = **{steady:.2f} ×** that at {first} task(s) in a running epoch, "
        f"**{amortised(last) / amortised(first):.2f} ×** with the per-epoch part spread over this epoch's {steps} "
        f"steps (goal ≤ 1.5).\n"
        f"- SharedDistiller at {last} tasks = **{versus_loop:.2f} ×** the hand-written loop (goal ≤ 1.3).\n\n"
        "ms per training step: the median over runs of each run's median timed epoch, divided by its steps. "
        "Bookkeeping = the time inside MultiTaskModule's `_update_metrics` and `_log_terms` (the grouped metric "
        "update, the loss terms' one vector, and the one `self.log` of the total loss, about 0.3 ms of Lightning's "
        "whatever the task count); *per epoch* = the first step's bookkeeping (which hands Lightning one key per task "
        "and metric or term) plus the epoch-end compute and reset of those keys; amortised = steady + per epoch / "
        "steps. mtm − bare: MultiTaskModule against a minimal LightningModule with its loss maths "
        "(`Task.supervised_loss` summed) and nothing else. The loop keeps the same metrics (per-task accuracy "
        "counts, per-task CE and KD sums) on the device, without a host sync; its losses are "
        "`F.cross_entropy(ignore_index=-100)` and `soft_target_kd`."
        + (f"\n\nErrors: {'; '.join(errors)}" if errors else "")
    )
    out = args.out or os.path.join(C.RESULTS, "overhead-tasks.md")
    job = (
        f"tiny MLP {TINY_FEATURES} → {TINY_STUDENT} (teacher → {TINY_TEACHER}), one 2-class head per task, batch "
        f"{args.tiny_batch}, {steps} steps/epoch, {args.epochs} epochs per run (first untimed), "
        f"{args.threads or 1} thread(s), {args.repeats} interleaved repeats, fresh process per run"
    )
    header = [
        "tasks",
        "loop ms",
        "bare Lightning ms",
        "SharedDistiller ms",
        "÷ loop",
        "MTM bare ms",
        "MultiTaskModule ms",
        "mtm − bare ms",
        "bookkeeping ms/step",
        "÷ first",
        "bookkeeping ms/epoch",
        "amortised ms/step",
        "÷ first",
    ]
    print(C.write_table(out, "Per-step cost against the number of tasks", job, header, rows, notes))
    print(f"written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_job_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (module.compile())")
    parser.add_argument("--tasks", type=int, nargs="+", help="task counts to sweep on the tiny MLP job instead")
    parser.add_argument("--tiny-batch", type=int, default=64, help="batch size of the task-count sweep")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=SWEEP_VARIANTS,
        default=list(SWEEP_VARIANTS),
        help="the sweep's variants to run (default: all)",
    )
    parser.add_argument("--tiny-steps", type=int, default=200, help="steps per epoch of the task-count sweep")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tasks and not args.threads:
        args.threads = 1  # the sweep's setting: one thread, as in the figures
    if args.worker:
        C.worker_main(args, run_sweep if ":" in args.worker else run)
        return
    argv = sys.argv[1:]
    if args.tasks:
        sweep_main(args, argv + (["--threads", "1"] if "--threads" not in argv else []))
        return
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
        rows.append(
            [
                names[v],
                f"{med[v]:.3f}",
                f"{1000 * med[v] / steps:.1f}",
                f"{med[v] / med['loop']:.3f}",
                f"{med[v] / med['lightning']:.3f}",
                f"{best[v]:.3f}",
                f"{best[v] / best['loop']:.3f}",
                f"{best[v] / best['lightning']:.3f}",
                f"{C.median_of(runs, 'peak_mb'):.0f}",
                all_runs + (f" (errors: {errors[0]})" if errors else ""),
            ]
        )
    ca, cb = med["ours"] / med["loop"], med["ours"] / med["lightning"]
    step_ms = 1000 * med["loop"] / steps
    notes = (
        f"c/a = **{ca:.3f}** (goal ≤ 1.10 at a step ≥ 20 ms; this step: {step_ms:.1f} ms), "
        f"c/b = **{cb:.3f}** (goal ≤ 1.03), b/a = {med['lightning'] / med['loop']:.3f} (medians); best runs: "
        f"c/a = {best['ours'] / best['loop']:.3f}, c/b = {best['ours'] / best['lightning']:.3f}.\n\n"
        "Epoch = median of the timed epochs of one run; the table shows the median over runs and every run's "
        "figure; best = the fastest run, the least disturbed on a shared machine. Epoch times on a 2-core machine "
        "swing ±15%: treat ±10% as a tie."
    )
    out = args.out or os.path.join(C.RESULTS, "overhead.md")
    header = [
        "variant",
        "epoch s (median)",
        "ms/step",
        "÷ a",
        "÷ b",
        "best s",
        "best ÷ a",
        "best ÷ b",
        "peak MB",
        "runs (epoch s)",
    ]
    print(C.write_table(out, "Overhead of the shared step", C.describe_job(args), header, rows, notes))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
