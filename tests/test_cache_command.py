"""`lightning-mtkd cache`: the teachers' outputs computed once into files that later runs of the same config reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TASKS, conv_net, quick_trainer, random_datamodule

from lightning_mtkd import MultiTaskModule
from lightning_mtkd.callbacks import TeacherCache
from lightning_mtkd.callbacks.teacher_cache import read_cache_file, read_header
from lightning_mtkd.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "multimnist" / "shared.yaml"
DATA = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.batch_size=16"]


@pytest.fixture
def teacher_path(tmp_path) -> str:
    torch.manual_seed(0)
    module = MultiTaskModule(conv_net((8, 16), 32), TASKS)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(module, random_datamodule(shape=(1, 36, 36)))
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


class TeacherSamples:
    """Counts the samples a teacher's forward passes see (a forward hook)."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.samples = 0
        teacher.register_forward_hook(self)

    def __call__(self, _module, inputs, _output) -> None:
        self.samples += inputs[0].shape[0]


def fit_with_cache(tmp_path, teacher_path, cache_dir, storage, *extra):
    cli = main(
        [
            "--config",
            str(CONFIG),
            f"--model.init_args.teacher={teacher_path}",
            "--trainer.max_epochs=2",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            *DATA,
            *extra,
            "--trainer.callbacks+=lightning_mtkd.callbacks.TeacherCache",
            f"--trainer.callbacks.storage={storage}",
            f"--trainer.callbacks.cache_dir={cache_dir}",
            "--report.latency_repeats=0",  # the report would time the teacher's forward on a batch
        ],
        run=False,
    )
    counter = TeacherSamples(cli.model.teachers["teacher"])
    cli.trainer.fit(cli.model, cli.datamodule)
    (cache,) = [c for c in cli.trainer.callbacks if isinstance(c, TeacherCache)]
    return cache, counter, cli.trainer


def cache_command(teacher_path, cache_dir, *options: str):
    """`lightning-mtkd cache` on the test config and data, into ``cache_dir``."""
    arguments = ["--config", str(CONFIG), f"--model.init_args.teacher={teacher_path}", *DATA]
    return main(["cache", *arguments, "--cache_dir", str(cache_dir), *options])


@pytest.mark.parametrize("storage", ["disk", "memory"])
def test_files_written_by_the_command_are_reused_without_a_teacher_forward_over_the_data(
    tmp_path, monkeypatch, teacher_path, storage
):
    monkeypatch.chdir(tmp_path)  # the config's ModelCheckpoint writes under ./checkpoints
    cache_dir = tmp_path / "cache"
    filled = cache_command(teacher_path, cache_dir)
    assert set(filled) == {"train", "val"} and all(info["complete"] for info in filled.values())
    assert filled["train"]["computed_batches"] == 4 and filled["val"]["computed_batches"] == 2
    for info in filled.values():
        assert read_header(info["path"])["complete"]
    train_rows = read_cache_file(filled["train"]["path"])
    assert train_rows["teacher/outputs/left"].shape == (64, 10)
    assert "teacher/features/backbone" in train_rows  # the hint's feature: SharedDistiller taps it

    # Another seed reads the files: every batch of both epochs served, none computed. The teacher sees only the
    # samples that set the run up: finding its shared feature and sizing the adaptor (2 each), and each split's
    # 2-sample probe of the outputs' layout (which the files' fingerprint covers).
    cache, counter, trainer = fit_with_cache(tmp_path, teacher_path, cache_dir, storage, "--seed_everything=7")
    assert cache.counts["train"] == {"cached": 8, "computed": 0}
    assert cache.counts["val"]["computed"] == 0
    assert counter.samples == 2 + 2 + 2 + 2, counter.samples
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(Path(i["path"]).name for i in filled.values())
    assert "val/left/teacher_acc" in trainer.callback_metrics

    # The command finds its own files complete and computes nothing.
    again = cache_command(teacher_path, cache_dir, "--splits", "train")
    assert list(again) == ["train"] and again["train"]["computed_batches"] == 0


def test_cached_outputs_equal_the_teachers_and_a_run_without_the_command_matches(tmp_path, monkeypatch, teacher_path):
    """The files hold the teacher's own outputs; a fit reading them logs what a fit filling its own cache logs."""
    monkeypatch.chdir(tmp_path)
    filled = cache_command(teacher_path, tmp_path / "pre", "--splits", "train", "val")
    reused, _, reused_trainer = fit_with_cache(tmp_path, teacher_path, tmp_path / "pre", "disk")
    own, _, own_trainer = fit_with_cache(tmp_path / "own", teacher_path, tmp_path / "own-cache", "disk")
    assert own.counts["train"] == {"cached": 4, "computed": 4}
    for key in ("train/loss_epoch", "train/hint", "val/left/kd", "val/left/teacher_acc", "val/loss"):
        torch.testing.assert_close(reused_trainer.callback_metrics[key], own_trainer.callback_metrics[key], msg=key)
    rows = read_cache_file(filled["train"]["path"])
    own_rows = read_cache_file(str(next((tmp_path / "own-cache").glob("train-*.bin"))))
    for key, value in own_rows.items():  # batch size and order differ: float rounding only
        torch.testing.assert_close(rows[key], value, rtol=0, atol=1e-5, msg=key)


def test_the_command_refuses_a_model_without_teachers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "multimnist" / "teacher.yaml"
    with pytest.raises(TypeError, match="caches a distillation strategy's teacher outputs"):
        main(["cache", "--config", str(config), *DATA])
