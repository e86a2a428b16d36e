"""A CLI run logged to W&B offline, read back from the run's own transaction log (no mocks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import TASKS, conv_net, quick_trainer, random_datamodule
from test_cli_configs import SMALL_DATA
from wandb_records import OfflineRun

from lightning_mtkd import MultiTaskModule
from lightning_mtkd.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


def test_cli_run_records_metrics_losses_config_report_and_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML's relative paths (checkpoints/) land here
    monkeypatch.setenv("WANDB_MODE", "offline")
    teacher = MultiTaskModule(conv_net((8, 16), 32), TASKS)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(teacher, random_datamodule(shape=(1, 36, 36)))
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")

    cli = main(
        [
            "fit",
            "--config", str(CONFIGS / "multimnist" / "shared.yaml"),
            "--config", str(CONFIGS / "logger" / "wandb.yaml"),
            f"--model.init_args.teacher={tmp_path / 'teacher.ckpt'}",
            "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
            "--trainer.logger.init_args.log_model=true",
            # absolute: W&B's service process is shared by every run of this pytest process and keeps the
            # working directory of the first one; a relative save_dir resolves there, not here
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--report.latency_repeats=2", "--report.print_table=false", *SMALL_DATA,
        ]
    )
    cli.trainer.test(cli.model, cli.datamodule, ckpt_path="best")
    logger = cli.trainer.logger
    run_id = logger.version
    logger.experiment.finish()  # what the end of the process does for a CLI run: flush the run's files

    run = OfflineRun(str(tmp_path))
    keys = run.logged_keys()
    for task in ("left", "right"):  # per-task metrics of student and teacher, every named loss term
        assert {f"val/{task}/acc", f"val/{task}/teacher_acc", f"test/{task}/acc", f"test/{task}/teacher_acc"} <= keys
        assert {f"train/{task}/loss", f"train/{task}/kd", f"val/{task}/kd"} <= keys
    assert {"train/hint", "val/hint", "train/loss_epoch", "val/loss"} <= keys

    # the module's hyper-parameters and the full CLI config (trainer, data, report options)
    assert run.config["temperature"] == 4.0
    cli_config = run.config["cli"]
    assert cli_config["trainer"]["max_epochs"] == 2 and cli_config["report"]["latency_repeats"] == 2

    # the report as a wandb.Table (its JSON in the run's media) and its chart, for fit and test
    for stage in ("val", "test"):
        table_ref = run.summary[f"report/{stage}/table"]
        assert table_ref["_type"] == "table-file"
        with open(run.file(table_ref["path"])) as handle:
            table = json.load(handle)
        assert table["columns"] == ["task", "metric", "teacher", "student", "gap"]
        rows = {row[0]: row for row in table["data"]}
        assert set(rows) == {"left", "right"}
        for task, row in rows.items():
            assert row[3] == pytest.approx(run.last(f"{stage}/{task}/acc"))
            assert row[2] == pytest.approx(run.last(f"{stage}/{task}/teacher_acc"))
            assert row[4] == pytest.approx(row[2] - row[3])
        assert run.summary[f"report/{stage}/speedup"] > 0
        chart = run.summary[f"report/{stage}/chart"]
        assert chart["_type"] == "images/separated" and chart["count"] == 1
        assert all(os.path.getsize(run.file(name)) > 1000 for name in chart["filenames"])

    # the student checkpoint as a model artifact (log_model), and the run directory's own files
    assert any(artifact.type == "model" for artifact in run.artifacts)
    run_dir = tmp_path / "lightning-mtkd" / run_id
    assert all((run_dir / name).is_file() for name in ("report.md", "report.png", "config.yaml"))
