"""Training-step cost of the weighting plug-ins and of strategies 4 and 5, relative to SharedDistiller.

    PYTHONPATH=. python benchmarks/weighting_overhead.py [--steps 10] [--rounds 3]

MultiMNIST-shaped inputs (batch 128, 1×36×36), the configs' models: conv teacher 32/64 → student 8/16,
and the transformer teacher (64 wide, 4 layers, 4 heads) → student (32, 2, 2). Untrained networks:
only the time matters here. The configurations take steps in turn, so background load hits them
alike, and the median step of each is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_mtkd import AdaptiveDistiller, AttentionDistiller, SharedDistiller, Task
from lightning_mtkd.models import ConvBackbone, MultiTaskNet, PatchTransformerBackbone
from lightning_mtkd.weighting import DynamicWeightAverage, GradNorm, TeacherAnnealing, UncertaintyWeighting

TASKS = [Task("left", num_classes=10), Task("right", num_classes=10)]
HEADS = {"left": 10, "right": 10}


def conv(widths: tuple[int, int], hidden: int) -> MultiTaskNet:
    return MultiTaskNet(ConvBackbone(widths=widths, hidden=hidden), HEADS)


def vit(dim: int, depth: int, heads: int) -> MultiTaskNet:
    return MultiTaskNet(PatchTransformerBackbone(image_size=36, patch_size=6, dim=dim, depth=depth, heads=heads), HEADS)


CONV_AT = [{"student": "backbone.features.3", "teacher": "backbone.features.3"},
           {"student": "backbone.features.7", "teacher": "backbone.features.7"}]
VIT_AT = [{"student": "backbone.encoder.layers.0.self_attn", "teacher": "backbone.encoder.layers.1.self_attn"},
          {"student": "backbone.encoder.layers.1.self_attn", "teacher": "backbone.encoder.layers.3.self_attn"}]

CONFIGS: dict[str, Callable[[], torch.nn.Module]] = {
    "shared (static)": lambda: SharedDistiller(conv((8, 16), 64), conv((32, 64), 256), TASKS),
    "shared + uncertainty": lambda: SharedDistiller(conv((8, 16), 64), conv((32, 64), 256), TASKS,
                                                    weighting=UncertaintyWeighting()),
    "shared + DWA": lambda: SharedDistiller(conv((8, 16), 64), conv((32, 64), 256), TASKS,
                                            weighting=DynamicWeightAverage()),
    "shared + GradNorm": lambda: SharedDistiller(conv((8, 16), 64), conv((32, 64), 256), TASKS, weighting=GradNorm()),
    "shared + annealing": lambda: SharedDistiller(conv((8, 16), 64), conv((32, 64), 256), TASKS,
                                                  weighting=TeacherAnnealing(total_steps=1000)),
    "adaptive": lambda: AdaptiveDistiller(conv((8, 16), 64), conv((32, 64), 256), TASKS, adaptive_temperature=True),
    "attention (conv AT)": lambda: AttentionDistiller(conv((8, 16), 64), conv((32, 64), 256), TASKS, layers=CONV_AT),
    "vit: soft targets only": lambda: AttentionDistiller(vit(32, 2, 2), vit(64, 4, 4), TASKS, layers=VIT_AT,
                                                         attention_weight=0.0),
    "vit: attention (KL)": lambda: AttentionDistiller(vit(32, 2, 2), vit(64, 4, 4), TASKS, layers=VIT_AT),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = {
        "input": torch.rand(128, 1, 36, 36),
        "targets": {name: torch.randint(0, 10, (128,)) for name in HEADS},
        "index": torch.arange(128),
    }
    modules = {}
    for name, make in CONFIGS.items():
        module = make()
        module.example_input_array = batch["input"][:2]
        module.setup("fit")
        if isinstance(module.weighting, GradNorm):  # what fit's on_fit_start does
            module.weighting.attach_model(module.model)
        module.train()
        modules[name] = (module, torch.optim.Adam([p for g in module.param_groups() for p in g["params"]], lr=1e-3))
    times: dict[str, list[float]] = {name: [] for name in modules}

    def step(name: str) -> float:
        module, optimizer = modules[name]
        start = time.perf_counter()
        loss = module.training_step(batch, 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    for name in modules:  # warm-up, not counted
        step(name)
        step(name)
    for _ in range(args.rounds * args.steps):  # one step of each configuration in turn
        for name in modules:
            times[name].append(step(name))
    base = statistics.median(times["shared (static)"])
    vit_base = statistics.median(times["vit: soft targets only"])
    print(f"{'configuration':<26} {'median step ms':>14} {'vs reference':>12}")
    for name, values in times.items():
        reference = vit_base if name.startswith("vit") else base
        print(f"{name:<26} {1000 * statistics.median(values):>14.1f} {statistics.median(values) / reference:>12.2f}")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")  # self.log outside a Trainer warns once per key
    main()
