"""Epoch time with and without the teacher-output cache, against the student trained alone (the floor).

For each strategy: the uncached distillation epoch; the cached epoch (arrays in memory, and in a
memory-mapped file); and a run whose cache was filled beforehand by the code of ``lightning-mtkd
cache`` (``precomputed``: its fill is timed on its own, and its first epoch is already cached); then
the student's own training epoch with no teacher at all. The first epoch of a cached run fills the
cache; it is reported on its own, and the later epochs are the cached figure. Goals: a cached epoch
≤ 1.10 × the student-only epoch, and ≥ 3.5 × faster than an uncached one.

Where a cached step's time goes, per step of the timed epochs: the teacher outputs (the cache's
gather by index, or the teachers' forward), the bookkeeping (``_update_metrics`` and ``_log_terms``),
and the minor page faults of the epoch (on CPU a step whose allocations fault in fresh pages pays
for it in every layer; which variant faults more is the allocator's doing, not the step's). Each run
is a fresh process (its peak memory is its own), runs interleaved, figures are medians. Writes
benchmarks/results/cache.md.

    python benchmarks/cache.py                                       # the full job (20,000 composites)
    python benchmarks/cache.py --num-train 4096 --repeats 3          # a quick look
    python benchmarks/cache.py --strategies lightning_mtkd.SharedDistiller my_pkg.MyDistiller

``--steps`` measures instead, in one process, one training step of each variant in turn (student alone,
each strategy with its cache filled in memory, each strategy uncached), so that all of them share the
allocator's state: what a cached step costs beyond the student's own, without the page-fault swings
between processes. Writes benchmarks/results/cache-steps.md.

    python benchmarks/cache.py --steps --num-train 4096
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # this checkout's package, and _common beside this file

import _common as C  # noqa: E402
import lightning as L  # noqa: E402

from lightning_mtkd import MultiTaskModule  # noqa: E402
from lightning_mtkd.callbacks import TeacherCache  # noqa: E402
from lightning_mtkd.cli import fill_cache  # noqa: E402

DEFAULT_STRATEGIES = ["lightning_mtkd.SharedDistiller", "lightning_mtkd.DistillationModule"]
MODES = ("uncached", "memory", "disk", "precomputed")
GOAL_FLOOR, GOAL_SPEEDUP = 1.10, 3.5


def strategy_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class StepParts(L.Callback):
    """Per-step time in the teacher outputs and in the bookkeeping, over the timed epochs (all but the first)."""

    def __init__(self, module: L.LightningModule) -> None:
        self.seconds = {"teacher": 0.0, "bookkeeping": 0.0}
        self.steps = 0
        wrapped = {"teacher_forward": "teacher", "_update_metrics": "bookkeeping", "_log_terms": "bookkeeping"}
        for method, part in wrapped.items():
            if hasattr(module, method):
                setattr(module, method, self._timed(getattr(module, method), part))

    def _timed(self, method: Any, part: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return timed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.seconds = dict.fromkeys(self.seconds, 0.0)
            self.steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.steps += trainer.current_epoch >= 1

    def per_step_ms(self) -> dict[str, float]:
        return {f"{part}_ms": 1000 * value / max(self.steps, 1) for part, value in self.seconds.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    timer = C.EpochTimer()
    callbacks: list[Any] = [timer]
    result: dict[str, Any] = {}
    cache, cache_dir = None, None
    if args.worker == "student":
        module: L.LightningModule = MultiTaskModule(C.student_net(args), C.TASKS)
    else:
        mode, _, path = args.worker.partition(":")
        module = strategy_class(path)(student=C.student_net(args), teacher=C.teacher_net(args), tasks=C.TASKS)
        if mode != "uncached":
            cache_dir = tempfile.mkdtemp(prefix="mtkd-bench-cache-")  # empty: the first epoch (or the fill) fills it
        if mode == "precomputed":  # what `lightning-mtkd cache` runs, then a run that reads its files into memory
            filler = strategy_class(path)(student=C.student_net(args), teacher=C.teacher_net(args), tasks=C.TASKS)
            start = time.perf_counter()
            fill_cache(
                filler,
                C.datamodule(args),
                TeacherCache(storage="disk", cache_dir=cache_dir, splits=["train"]),
                ["train"],
                args.accelerator,
                args.precision,
            )
            result["fill_s"] = time.perf_counter() - start
            cache = TeacherCache(storage="memory", cache_dir=cache_dir, splits=["train"])
        elif mode in ("memory", "disk"):
            cache = TeacherCache(storage=mode, cache_dir=cache_dir, feature_dtype=args.feature_dtype)
        if cache is not None:
            callbacks.append(cache)
    parts = StepParts(module)
    callbacks.append(parts)
    try:
        C.trainer(args, callbacks).fit(module, C.datamodule(args))
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    result.update(first_s=timer.times[0], epoch_s=C.timed_epochs(timer.times), epochs=timer.times)
    result["faults"] = statistics.median(timer.faults[1:] or timer.faults)
    result.update(parts.per_step_ms())
    if cache is not None:
        result["cache_mb"] = sum(cache.nbytes.values()) / 2**20
        result["counts"] = cache.counts["train"]
    return result


def steps_main(args: argparse.Namespace) -> None:
    """One process, steps interleaved: student alone, each strategy cached (a real memory TeacherCache, filled
    by the cache command's code) and uncached; median ms per step of every epoch but the first."""
    import types
    import warnings

    import torch
    from lightning.pytorch.trainer.states import RunningStage

    warnings.filterwarnings("ignore")  # steps run outside a Trainer: self.log warns and returns
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dm = C.datamodule(args)
    modules: dict[str, Any] = {"student alone": MultiTaskModule(C.student_net(args), C.TASKS)}
    caches: dict[str, TeacherCache] = {}
    for path in args.strategies:
        name = path.rpartition(".")[2]
        for mode in ("cached", "uncached"):
            module = strategy_class(path)(student=C.student_net(args), teacher=C.teacher_net(args), tasks=C.TASKS)
            module.example_input_array = dm.splits["train"].inputs[:2]
            if mode == "cached":
                cache = TeacherCache(storage="memory", splits=["train"])
                fill_cache(module, dm, cache, ["train"], "cpu", args.precision)
                module.trainer = None  # stepped by hand below: no loop to log into
                cache._trainer = types.SimpleNamespace(state=types.SimpleNamespace(stage=RunningStage.TRAINING))
                module.teacher_cache = cache
                caches[name] = cache
            else:
                module.setup("fit")
            modules[f"{name}, {mode}"] = module
    parts = {name: StepParts(module) for name, module in modules.items()}
    optimizers = {
        name: torch.optim.Adam([p for g in m.param_groups() for p in g["params"]], lr=1e-3)
        for name, m in modules.items()
    }
    times: dict[str, list[float]] = {name: [] for name in modules}
    for module in modules.values():
        module.train()
    for epoch in range(args.epochs):
        for batch in dm.train_dataloader():
            for name, module in modules.items():
                start = time.perf_counter()
                loss = module.training_step(batch, 0)["loss"]
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
                if epoch > 0:
                    times[name].append(time.perf_counter() - start)
                    parts[name].steps += 1
                else:
                    parts[name].seconds = dict.fromkeys(parts[name].seconds, 0.0)
    base = statistics.median(times["student alone"])
    rows = []
    for name, values in times.items():
        step = statistics.median(values)
        per_step = parts[name].per_step_ms()
        rows.append(
            [
                name,
                f"{1000 * step:.2f}",
                f"{step / base:.3f}",
                f"{per_step['teacher_ms']:.2f}",
                f"{per_step['bookkeeping_ms']:.2f}",
            ]
        )
    notes = (
        "One process; each batch is stepped by every variant in turn (training_step, backward, Adam), so they share "
        "the allocator's state; median over the steps of every epoch but the first. Cached: a memory TeacherCache "
        "filled beforehand (`lightning_mtkd.cli.fill_cache`, the cache command's code); teacher outputs ms/step = "
        "time in `teacher_forward` (the gather by index); bookkeeping = `_update_metrics` + `_log_terms` (here "
        "outside a Trainer: no `self.log`). What a cached step adds to the student's: the gather, the soft-target "
        "terms, the hint's adaptor and feature distance (SharedDistiller), and Adam over the adaptor."
    )
    header = ["variant", "ms/step (median)", "÷ student alone", "teacher outputs ms/step", "bookkeeping ms/step"]
    out = args.out or os.path.join(C.RESULTS, "cache-steps.md")
    job = C.describe_job(args).rsplit("; ", 1)[0] + f"; {args.epochs} epochs (first untimed), one process, interleaved"
    print(C.write_table(out, "Teacher-output cache: one step, in one process", job, header, rows, notes))
    print(f"written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_job_arguments(parser)
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES, help="strategy classes (dotted paths)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--feature-dtype", default="same", choices=["same", "float16", "bfloat16"])
    parser.add_argument("--steps", action="store_true", help="one process, steps interleaved (see above)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps:
        steps_main(args)
        return
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch fills the cache, the later ones are the cached figure")
    if args.worker:
        C.worker_main(args, run)
        return
    variants = ["student"] + [f"{mode}:{path}" for path in args.strategies for mode in args.modes]
    results = C.interleave(os.path.abspath(__file__), variants, sys.argv[1:], args.repeats)
    steps = -(-args.num_train // args.batch_size)
    student = C.median_of(results["student"], "epoch_s")

    def per_step(runs: list[dict], key: str) -> str:
        return f"{C.median_of(runs, key):.2f}" if any(key in r for r in runs) else "—"

    rows, verdicts = [], []
    runs = results["student"]
    rows.append(
        [
            "student alone (no teacher)",
            "—",
            "—",
            f"{student:.3f}",
            "1.00",
            "—",
            "—",
            per_step(runs, "bookkeeping_ms"),
            f"{C.median_of(runs, 'faults'):.0f}",
            f"{C.median_of(runs, 'peak_mb'):.0f}",
            "—",
        ]
    )
    for path in args.strategies:
        name = path.rpartition(".")[2]
        uncached = C.median_of(results.get(f"uncached:{path}", []), "epoch_s")
        for mode in args.modes:
            runs = results[f"{mode}:{path}"]
            errors = [r["error"] for r in runs if "error" in r]
            if errors and len(errors) == len(runs):
                rows.append([name, mode, "error", errors[0], "", "", "", "", "", "", ""])
                continue
            epoch, first = C.median_of(runs, "epoch_s"), C.median_of(runs, "first_s")
            ratio, speedup = epoch / student, uncached / epoch
            label = {"uncached": "no cache", "precomputed": "filled by the cache command, read into memory"}
            cache_mb = "—" if mode == "uncached" else f"{C.median_of(runs, 'cache_mb'):.2f}"
            rows.append(
                [
                    name,
                    label.get(mode, f"cache in {mode}"),
                    f"{first:.3f}",
                    f"{epoch:.3f}",
                    f"{ratio:.2f}",
                    "1.00" if mode == "uncached" else f"{speedup:.2f}×",
                    per_step(runs, "teacher_ms"),
                    per_step(runs, "bookkeeping_ms"),
                    f"{C.median_of(runs, 'faults'):.0f}",
                    f"{C.median_of(runs, 'peak_mb'):.0f}",
                    cache_mb,
                ]
            )
            if mode != "uncached":
                meets = ratio <= GOAL_FLOOR and speedup >= GOAL_SPEEDUP
                verdicts.append(
                    f"{name}, {label.get(mode, f'cache in {mode}')}: {ratio:.2f} × the student-only epoch (goal ≤ "
                    f"{GOAL_FLOOR}), {speedup:.2f}× faster than uncached (goal ≥ {GOAL_SPEEDUP}): "
                    f"{'meets both' if meets else 'misses'}"
                )
            if mode == "precomputed":
                fill = C.median_of(runs, "fill_s")
                refill = C.median_of(results.get(f"memory:{path}", []), "first_s") - C.median_of(
                    results.get(f"memory:{path}", []), "epoch_s"
                )
                verdicts.append(
                    f"{name}: the fill (`lightning-mtkd cache`'s code, in-process) took {fill:.2f} s once; a run "
                    f"that fills its own cache pays {refill:.2f} s in its first epoch (first − cached epoch, memory)"
                )
    header = [
        "strategy",
        "teacher outputs",
        "first epoch s",
        "epoch s (median)",
        "÷ student alone",
        "speed-up over uncached",
        "teacher outputs ms/step",
        "bookkeeping ms/step",
        "page faults/epoch",
        "peak MB",
        "cache MB",
    ]
    notes = (
        "\n".join(f"- {v}" for v in verdicts)
        + f"\n\n{steps} steps per epoch. First epoch: with a cache, the epoch that fills it (≈ uncached) — except "
        "`precomputed`, whose files were filled beforehand; it is also every run's warm-up. Epoch = median of the "
        "later epochs of one run, then the median over runs. Teacher outputs ms/step: the time in "
        "`teacher_forward` (the cache's gather by index, or the teachers' forward without a cache). Page faults: "
        "minor faults of the process per timed epoch (median). Peak MB: the process's peak resident set (GPU: peak "
        "allocated), imports included. Epoch times on a shared 2-core machine swing ±15%: treat ±10% as a tie."
    )
    out = args.out or os.path.join(C.RESULTS, "cache.md")
    print(C.write_table(out, "Teacher-output cache: epoch times", C.describe_job(args), header, rows, notes))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
