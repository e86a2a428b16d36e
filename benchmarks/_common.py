"""What the benchmarks share: the MultiMNIST job, fresh-process workers, interleaved repeats, tables.

Every measurement runs in a fresh Python process (so one variant's allocator state or page faults
never leak into the next, and its peak memory is its own), variants interleaved repeat by repeat
(a, b, c, a, b, c, …) so that a machine's drift hits all of them alike; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch

from lightning_mtkd import Task
from lightning_mtkd.data import MultiMNISTDataModule
from lightning_mtkd.models import ConvBackbone, MultiTaskNet, count_parameters

TASKS = [Task("left", num_classes=10), Task("right", num_classes=10)]
HEADS = {"left": 10, "right": 10}
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that size the job (defaults: the MultiMNIST job measured by hand before the library existed, with the
    recipe's 623K teacher of configs/multimnist/teacher.yaml)."""
    parser.add_argument("--num-train", type=int, default=20000, help="training composites per epoch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--teacher-widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--student-widths", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is a warm-up, not timed")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant, interleaved")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/<name>.md)")


def datamodule(args: argparse.Namespace) -> MultiMNISTDataModule:
    dm = MultiMNISTDataModule(num_train=args.num_train, num_val=8, num_test=8, batch_size=args.batch_size, seed=0)
    dm.setup()
    return dm


def teacher_net(args: argparse.Namespace) -> MultiTaskNet:
    torch.manual_seed(1)
    return MultiTaskNet(ConvBackbone(widths=tuple(args.teacher_widths), hidden=args.teacher_hidden), HEADS).eval()


def student_net(args: argparse.Namespace) -> MultiTaskNet:
    torch.manual_seed(2)
    return MultiTaskNet(ConvBackbone(widths=tuple(args.student_widths), hidden=args.student_hidden), HEADS)


def describe_job(args: argparse.Namespace) -> str:
    teacher, student = count_parameters(teacher_net(args)), count_parameters(student_net(args))
    steps = -(-args.num_train // args.batch_size)
    return (
        f"MultiMNIST 36×36, {args.num_train} training composites, batch {args.batch_size} ({steps} steps/epoch); "
        f"teacher {teacher / 1e3:.0f}K params, student {student / 1e3:.1f}K params; Adam 1e-3; "
        f"{args.accelerator}, precision {args.precision}; {args.epochs} epochs per run (first untimed), "
        f"{args.repeats} interleaved repeats, fresh process per run"
    )


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores{gpu}; "
        f"torch {torch.__version__}, lightning {L.__version__}, Python {platform.python_version()}; "
        f"load average {load:.1f} when the run ended"
    )


class EpochTimer(L.Callback):
    """Wall time of each training epoch (synchronising a GPU at both ends), and the minor page faults the process
    took in it: on CPU a step's allocations can fault in fresh pages every time, which costs as much as a layer."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.faults: list[int] = []
        self._start = 0.0
        self._faults = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync()
        self._faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync()
        self.times.append(time.perf_counter() - self._start)
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._faults)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def trainer(args: argparse.Namespace, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    return L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=args.epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU memory allocated on a GPU, else the resident set (Linux: KiB)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_main(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict[str, Any]]) -> None:
    """In the worker process: run one variant and print its figures as the last line (JSON)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    result["peak_mb"] = peak_memory_mb()
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(script: str, variant: str, argv: Sequence[str]) -> dict[str, Any]:
    """Run ``script --worker variant`` in a fresh process; its figures (or its error)."""
    command = [sys.executable, script, "--worker", variant, *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    return {"error": " | ".join(tail)}


def interleave(script: str, variants: Sequence[str], argv: Sequence[str], repeats: int) -> dict[str, list[dict]]:
    """Every variant ``repeats`` times, interleaved; results per variant in run order."""
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(repeats):
        for variant in variants:
            result = run_worker(script, variant, argv)
            results[variant].append(result)
            shown = result.get("error") or ", ".join(f"{k}={_fmt(v)}" for k, v in result.items())
            print(f"[{repeat + 1}/{repeats}] {variant}: {shown}", file=sys.stderr, flush=True)
    return results


def median_of(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def min_of(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return min(values) if values else float("nan")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def write_table(
    path: str, title: str, job: str, header: Sequence[str], rows: Sequence[Sequence[str]], notes: str
) -> str:
    """A markdown report: title, machine, job, the table, notes, and the command that made it."""
    lines = [
        f"# {title}",
        "",
        f"- Machine: {machine()}",
        f"- Job: {job}",
        f"- Command: `{' '.join(['python', *sys.argv])}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        notes.strip(),
        "",
    ]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


def timed_epochs(times: list[float]) -> float:
    """Median of the timed epochs (all but the first, the warm-up; the only one if there is one)."""
    return statistics.median(times[1:] if len(times) > 1 else times)
