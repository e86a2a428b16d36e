"""The distillation report: figures match what the run logged, files and loggers get them."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning as L
import pytest
from conftest import TASKS, conv_net, quick_trainer, random_datamodule
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread
from test_cli_configs import SMALL_DATA

from lightning_mtkd import MultiTaskModule, SharedDistiller
from lightning_mtkd.callbacks import DistillationReport, measure_latency
from lightning_mtkd.cli import main
from lightning_mtkd.models import count_parameters


@pytest.fixture
def distilled(tmp_path):
    L.seed_everything(0)
    teacher = conv_net((8, 16), 32)
    module = SharedDistiller(conv_net(), teacher, TASKS)
    report = DistillationReport(latency_batch_size=8, latency_repeats=3, latency_warmup=1, print_table=False)
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = quick_trainer(tmp_path, limit_train_batches=2, limit_val_batches=2, logger=logger, callbacks=[report])
    trainer.fit(module, random_datamodule())
    return module, teacher, report, trainer


def test_fit_report_matches_logged_metrics(distilled):
    module, teacher, report, trainer = distilled
    summary = report.summaries["val"]
    logged = trainer.callback_metrics
    assert [t.task for t in summary.tasks] == ["left", "right"]
    for row in summary.tasks:
        assert row.metric == "acc"
        assert row.teacher == pytest.approx(float(logged[f"val/{row.task}/teacher_acc"]))
        assert row.student == pytest.approx(float(logged[f"val/{row.task}/acc"]))
        assert row.gap == pytest.approx(row.teacher - row.student)
    assert summary.student_params == count_parameters(module.model)
    assert summary.teacher_params == {"teacher": count_parameters(teacher)}
    assert summary.batch_size == 8
    assert summary.student_latency_ms > 0 and summary.teacher_latency_ms > 0
    assert summary.speedup == pytest.approx(summary.teacher_latency_ms / summary.student_latency_ms)


def test_report_files_and_logger(distilled):
    module, _, report, trainer = distilled
    run_dir = trainer.logger.log_dir
    assert report.files == {"markdown": f"{run_dir}/report.md", "chart": f"{run_dir}/report.png"}
    text = Path(report.files["markdown"]).read_text()
    left = report.summaries["val"].tasks[0]
    assert f"| left | acc | {left.teacher:.4f} | {left.student:.4f} | {left.gap:.4f} |" in text
    assert f"| student | {count_parameters(module.model):,} |" in text
    assert imread(report.files["chart"]).shape[2] in (3, 4)  # a real PNG image

    trainer.test(module, random_datamodule())
    text = Path(report.files["markdown"]).read_text()
    assert "validation (end of fit)" in text and "## Distillation report — test" in text
    trainer.logger.save()
    with open(os.path.join(run_dir, "metrics.csv")) as handle:
        rows = list(csv.DictReader(handle))
    logged = {k: float(v) for row in rows for k, v in row.items() if v and k.startswith("report/")}
    assert logged["report/test/left/student_acc"] == pytest.approx(report.summaries["test"].tasks[0].student)
    assert logged["report/val/speedup"] == pytest.approx(report.summaries["val"].speedup, rel=1e-5)


def test_report_without_teacher(tmp_path, capsys):
    module = MultiTaskModule(conv_net(), TASKS)
    report = DistillationReport(latency_repeats=2, latency_warmup=0)
    trainer = quick_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1, callbacks=[report])
    trainer.fit(module, random_datamodule())
    summary = report.summaries["val"]
    assert all(t.teacher is None and t.gap is None and t.student is not None for t in summary.tasks)
    assert summary.teacher_params == {} and summary.speedup is None
    assert os.path.isfile(os.path.join(str(tmp_path), "report.png"))
    assert "Distillation report (val)" in capsys.readouterr().out  # the rich table


def test_disabled_report_writes_nothing(tmp_path):
    report = DistillationReport(enabled=False)
    trainer = quick_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1, callbacks=[report])
    trainer.fit(MultiTaskModule(conv_net(), TASKS), random_datamodule())
    assert report.summaries == {} and not os.path.exists(tmp_path / "report.md")


def test_latency_grows_with_work():
    import torch

    small, large = torch.nn.Linear(64, 64), torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(40)])
    x = torch.randn(256, 64)
    assert measure_latency(large, x, repeats=5) > measure_latency(small, x, repeats=5)
    assert large.training  # restored


def test_bad_latency_options_are_named():
    with pytest.raises(ValueError, match="latency_batch_size"):
        DistillationReport(latency_batch_size=0)


def test_cli_adds_the_report_by_default(tmp_path):
    config = Path(__file__).parents[1] / "configs" / "multimnist" / "scratch.yaml"
    base = ["fit", "--config", str(config), "--trainer.fast_dev_run=1", "--report.latency_repeats=1", *SMALL_DATA]
    cli = main([*base, f"--trainer.default_root_dir={tmp_path / 'on'}"])
    (report,) = [c for c in cli.trainer.callbacks if isinstance(c, DistillationReport)]
    assert report.summaries["val"].student_params == count_parameters(cli.model.model)
    assert (tmp_path / "on" / "report.md").is_file()
    cli = main([*base, f"--trainer.default_root_dir={tmp_path / 'off'}", "--report.enabled=false"])
    assert not (tmp_path / "off" / "report.md").exists()


def test_several_teachers_are_counted_and_timed_together(tmp_path):
    from lightning_mtkd import DistillationModule

    teachers = {"left": conv_net((8, 16), 32), "right": conv_net((4, 8), 16)}
    module = DistillationModule(conv_net(), teachers, TASKS)
    report = DistillationReport(latency_repeats=3, latency_warmup=1, print_table=False)
    trainer = quick_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1, callbacks=[report])
    trainer.fit(module, random_datamodule())
    summary = report.summaries["val"]
    assert summary.teacher_params == {name: count_parameters(net) for name, net in teachers.items()}
    text = Path(report.files["markdown"]).read_text()
    assert f"| teacher left | {count_parameters(teachers['left']):,} | |" in text
    assert f"| teachers, all | {summary.teacher_params_total:,} | {summary.teacher_latency_ms:.2f} |" in text
    for row in summary.tasks:  # each task against its own teacher
        assert row.teacher == pytest.approx(float(trainer.callback_metrics[f"val/{row.task}/teacher_acc"]))
