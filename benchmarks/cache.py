"""Epoch time with and without the teacher-output cache, against the student trained alone (the floor).

For each strategy: the uncached distillation epoch, the cached epoch (arrays in memory, and in a
memory-mapped file), and the student's own training epoch with no teacher at all. The first
epoch of a cached run fills the cache; it is reported on its own, and the later epochs are the
cached figure. Goal: a cached epoch ≤ 1.15 × the student-only epoch. Each run is a fresh process
(its peak memory is its own), runs interleaved, figures are medians. Writes
benchmarks/results/cache.md.

    python benchmarks/cache.py                                       # the full job (20,000 composites)
    python benchmarks/cache.py --num-train 2048 --repeats 3          # a quick look
    python benchmarks/cache.py --strategies lightning_mtkd.SharedDistiller my_pkg.MyDistiller
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # this checkout's package, and _common beside this file

import _common as C  # noqa: E402

from lightning_mtkd import MultiTaskModule  # noqa: E402
from lightning_mtkd.callbacks import TeacherCache  # noqa: E402

DEFAULT_STRATEGIES = ["lightning_mtkd.SharedDistiller", "lightning_mtkd.DistillationModule"]
MODES = ("uncached", "memory", "disk")


def strategy_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    timer = C.EpochTimer()
    callbacks: list[Any] = [timer]
    if args.worker == "student":
        module = MultiTaskModule(C.student_net(args), C.TASKS)
    else:
        mode, _, path = args.worker.partition(":")
        module = strategy_class(path)(student=C.student_net(args), teacher=C.teacher_net(args), tasks=C.TASKS)
        if mode != "uncached":
            cache_dir = tempfile.mkdtemp(prefix="mtkd-bench-cache-")  # empty: the first epoch fills it
            callbacks.append(TeacherCache(storage=mode, cache_dir=cache_dir, feature_dtype=args.feature_dtype))
    try:
        C.trainer(args, callbacks).fit(module, C.datamodule(args))
    finally:
        if len(callbacks) > 1:
            shutil.rmtree(callbacks[1].cache_dir, ignore_errors=True)
    result: dict[str, Any] = {"first_s": timer.times[0], "epoch_s": C.timed_epochs(timer.times), "epochs": timer.times}
    if len(callbacks) > 1:
        result["cache_mb"] = sum(callbacks[1].nbytes.values()) / 2**20
        result["counts"] = callbacks[1].counts["train"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_job_arguments(parser)
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES, help="strategy classes (dotted paths)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--feature-dtype", default="same", choices=["same", "float16", "bfloat16"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch fills the cache, the later ones are the cached figure")
    if args.worker:
        C.worker_main(args, run)
        return
    variants = ["student"] + [f"{mode}:{path}" for path in args.strategies for mode in args.modes]
    results = C.interleave(os.path.abspath(__file__), variants, sys.argv[1:], args.repeats)
    student = C.median_of(results["student"], "epoch_s")
    rows, verdicts = [], []
    rows.append(["student alone (no teacher)", "—", "—", f"{student:.3f}", "1.00", "—",
                 f"{C.median_of(results['student'], 'peak_mb'):.0f}", "—"])
    for path in args.strategies:
        name = path.rpartition(".")[2]
        uncached = C.median_of(results.get(f"uncached:{path}", []), "epoch_s")
        for mode in args.modes:
            runs = results[f"{mode}:{path}"]
            errors = [r["error"] for r in runs if "error" in r]
            if errors and len(errors) == len(runs):
                rows.append([name, mode, "error", errors[0], "", "", "", ""])
                continue
            epoch = C.median_of(runs, "epoch_s")
            first = C.median_of(runs, "first_s")
            ratio = epoch / student
            cache_mb = C.median_of(runs, "cache_mb")
            rows.append([
                name, "no cache" if mode == "uncached" else f"cache in {mode}",
                f"{first:.3f}", f"{epoch:.3f}", f"{ratio:.2f}",
                "1.00" if mode == "uncached" else f"{uncached / epoch:.2f}×",
                f"{C.median_of(runs, 'peak_mb'):.0f}", "—" if mode == "uncached" else f"{cache_mb:.2f}",
            ])
            if mode != "uncached":
                verdicts.append(f"{name}, cache in {mode}: {ratio:.2f} × the student-only epoch "
                                f"({'meets' if ratio <= 1.15 else 'misses'} the ≤ 1.15 goal), "
                                f"{uncached / epoch:.2f}× faster than uncached")
    header = ["strategy", "teacher outputs", "first epoch s", "epoch s (median)", "÷ student alone",
              "speed-up over uncached", "peak MB", "cache MB"]
    notes = (
        "\n".join(f"- {v}" for v in verdicts)
        + "\n\nFirst epoch: with a cache, the epoch that fills it (≈ uncached); it is also every run's warm-up. "
        "Epoch = median of the later epochs of one run, then the median over runs. Peak MB: the process's peak "
        "resident set (GPU: peak allocated), imports included. Epoch times on a shared 2-core machine swing ±15% "
        "(shared/MEASUREMENTS.md): treat ±10% as a tie."
    )
    out = args.out or os.path.join(C.RESULTS, "cache.md")
    print(C.write_table(out, "Teacher-output cache: epoch times", C.describe_job(args), header, rows, notes))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
