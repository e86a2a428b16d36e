"""Memory format: ConvBackbone in NCHW vs NHWC (``channels_last``), the demo's student and teacher, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/memory_format.py              # or --threads 2, --batch-size 256

One training step (forward, backward, Adam) and one forward pass under ``inference_mode`` on a batch
of MultiMNIST-shaped inputs, for the demo's student (widths 8/16, hidden 64) and teacher (32/64/128,
hidden 256), each built twice from the same seed: ``channels_last=False`` and ``True``. The two
variants alternate repeat by repeat in one process, so drift hits both alike; figures are medians.
Also checks that both layouts give the same outputs. Writes ``benchmarks/results/memory_format.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import torch

from lightning_mtkd.models import ConvBackbone, MultiTaskNet
from lightning_mtkd.recipe import RECIPE, TASKS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(spec: dict, channels_last: bool) -> torch.nn.Module:
    """The demo's net for ``spec`` (dropout off, so both layouts compute the same function), seeded alike."""
    torch.manual_seed(0)
    backbone = ConvBackbone(widths=spec["widths"], hidden=spec["hidden"], channels_last=channels_last)
    return MultiTaskNet(backbone, {task.name: task.num_classes for task in TASKS})


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = sum(out.logsumexp(dim=1).mean() for out in net(x).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def median_ms(work: Callable[[], None], steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(name: str, spec: dict, batch: int, steps: int, repeats: int) -> list[str]:
    x = torch.rand(batch, 1, 36, 36)
    nets = {layout: build(spec, layout == "NHWC") for layout in ("NCHW", "NHWC")}
    with torch.no_grad():
        difference = (nets["NCHW"](x)["left"] - nets["NHWC"](x)["left"]).abs().max().item()
    optimizers = {layout: torch.optim.Adam(net.parameters()) for layout, net in nets.items()}
    timings: dict[str, dict[str, list[float]]] = {layout: {"train": [], "forward": []} for layout in nets}

    def forward(net: torch.nn.Module) -> None:
        with torch.inference_mode():
            net(x)

    for layout in nets:  # warm-up: oneDNN picks and caches its kernels
        train_step(nets[layout], optimizers[layout], x)
        forward(nets[layout])
    for _ in range(repeats):
        for layout, net in nets.items():
            timings[layout]["train"].append(median_ms(functools.partial(train_step, net, optimizers[layout], x), steps))
            timings[layout]["forward"].append(median_ms(functools.partial(forward, net), steps))
    rows = []
    for kind in ("train", "forward"):
        nchw, nhwc = (statistics.median(timings[layout][kind]) for layout in ("NCHW", "NHWC"))
        rows.append(f"| {name} | {kind} | {nchw:.1f} | {nhwc:.1f} | {nchw / nhwc:.2f}× |")
    rows.append(f"| {name} | max output difference | {difference:.1e} | | |")
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="ConvBackbone step time, NCHW vs channels_last.")
    parser.add_argument("--batch-size", type=int, default=RECIPE["data"]["batch_size"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="alternations of the two layouts")
    parser.add_argument("--out", default=os.path.join(RESULTS, "memory_format.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        "| model | what | NCHW ms | NHWC ms | speed-up |",
        "| --- | --- | --- | --- | --- |",
        *measure("student", RECIPE["student"], args.batch_size, args.steps, args.repeats),
        *measure("teacher", RECIPE["teacher"], args.batch_size, max(2, args.steps // 4), args.repeats),
    ]
    setup = (
        f"Batch {args.batch_size} of 1×36×36, {args.threads} thread(s), median of {args.repeats} × "
        f"{args.steps} steps (teacher: fewer), torch {torch.__version__}, {os.cpu_count()} CPU cores."
    )
    text = "\n".join(lines) + "\n\n" + setup + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write("# Memory format (benchmarks/memory_format.py)\n\n" + text)
    return text


if __name__ == "__main__":
    main()
