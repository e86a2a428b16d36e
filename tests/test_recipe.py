"""One recipe: the demo, the benchmarks and configs/multimnist/ read the same values (lightning_mtkd.recipe)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from lightning_mtkd.recipe import RECIPE

CONFIGS = Path(__file__).parents[1] / "configs" / "multimnist"
STUDENTS = ["scratch.yaml", "shared.yaml", "task_specific.yaml", "adaptive.yaml", "attention.yaml", "fusion.yaml"]
DISTILLERS = [name for name in STUDENTS if name != "scratch.yaml"] + ["transfer.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def backbone(config: dict) -> dict:
    args = config["model"]["init_args"]
    network = args.get("model", args.get("student"))
    return network["init_args"]["backbone"]["init_args"]


@pytest.mark.parametrize("name", ["teacher.yaml", *STUDENTS, "transfer.yaml"])
def test_data_and_seed_are_the_recipes(name):
    config = load(name)
    assert config["data"]["init_args"] == RECIPE["data"]
    assert config["seed_everything"] == RECIPE["seed"]


@pytest.mark.parametrize("name", ["teacher.yaml", "teacher_left.yaml", "teacher_right.yaml"])
def test_the_teachers_are_the_recipes(name):
    config, spec = load(name), RECIPE["teacher"]
    assert backbone(config) == {key: spec[key] for key in ("widths", "hidden", "dropout")}
    assert config["trainer"]["max_epochs"] == spec["epochs"]
    assert config["seed_everything"] == spec["seed"]


def test_transfer_students_are_the_recipes():
    students = load("transfer.yaml")["model"]["init_args"]["student"]
    for network in students.values():
        assert network["init_args"]["backbone"]["init_args"] == RECIPE["per_task_student"]


def test_the_attention_layer_map_is_the_recipes():
    assert load("attention.yaml")["model"]["init_args"]["layers"] == RECIPE["attention_layers"]


@pytest.mark.parametrize("name", STUDENTS)
def test_every_student_is_the_recipes(name):
    config, spec = load(name), RECIPE["student"]
    assert backbone(config) == {key: spec[key] for key in ("widths", "hidden")}
    assert config["trainer"]["max_epochs"] == spec["epochs"]
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == spec["lr"]


@pytest.mark.parametrize("name", DISTILLERS)
def test_every_distiller_has_the_recipes_soft_targets_and_otherwise_its_defaults(name):
    args = load(name)["model"]["init_args"]
    assert {key: args[key] for key in RECIPE["distill"]} == RECIPE["distill"]
    # No feature setting overrides a strategy's defaults (the recipe measures strategies at their defaults).
    assert not {"hint_weight", "feature_weight", "student_feature", "teacher_feature"} & set(args), name


def test_a_cosine_student_schedule_decays_the_learning_rate_to_zero_over_its_epochs():
    import torch

    from lightning_mtkd.recipe import student_optimizer

    assert set(student_optimizer(RECIPE["student"])) == {"optimizer"}  # the recipe itself keeps a constant rate
    settings = student_optimizer({**RECIPE["student"], "epochs": 4, "schedule": "cosine"})
    optimizer = settings["optimizer"]([torch.nn.Parameter(torch.zeros(1))])
    scheduler = settings["scheduler"](optimizer)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([RECIPE["student"]["lr"] * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        student_optimizer({**RECIPE["student"], "schedule": "step"})
