"""The `lightning-mtkd` console script as a shell, `make` or a cluster scheduler sees it: its exit status.

Run in subprocesses through the installed entry point (`lightning_mtkd.cli:console_main`), so `fit … &&
next-step` works: 0 after a successful fit, test and export; 1 with one line naming the problem on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_configs import SMALL_DATA

ROOT = Path(__file__).parents[1]
FAST = ["--trainer.fast_dev_run=1", "--trainer.logger=false", "--report.latency_repeats=0"]


def lightning_mtkd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The console script, as `pip install` writes it: `sys.exit(console_main())`."""
    code = "import sys; from lightning_mtkd.cli import console_main; sys.exit(console_main())"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    environment.pop("LIGHTNING_MTKD_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_fit_test_and_export_exit_zero_and_a_failure_exits_one_with_a_clear_line(tmp_path):
    teacher = str(ROOT / "configs" / "multimnist" / "teacher.yaml")
    fit = lightning_mtkd("fit", "--config", teacher, *FAST, *SMALL_DATA, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    checkpoint = tmp_path / "checkpoints" / "multimnist" / "teacher.ckpt"
    # fast_dev_run saves no checkpoint: write one with a real (tiny) fit, which must also exit 0.
    fit = lightning_mtkd(
        "fit", "--config", teacher, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1", "--trainer.logger=false", "--report.latency_repeats=0", *SMALL_DATA,
        cwd=tmp_path,
    )
    assert fit.returncode == 0 and checkpoint.is_file(), fit.stderr[-2000:]

    test = lightning_mtkd("test", "--config", teacher, f"--ckpt_path={checkpoint}", *FAST, *SMALL_DATA, cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]

    output = tmp_path / "teacher.pt"
    export = lightning_mtkd(
        "export", f"--ckpt_path={checkpoint}", "--format=torchscript", f"--output={output}", "--input_shape=[1,36,36]",
        cwd=tmp_path,
    )
    assert export.returncode == 0 and output.is_file(), export.stderr[-2000:]
    assert "exported" in export.stdout

    shared = str(ROOT / "configs" / "multimnist" / "shared.yaml")  # its teacher path does not exist here
    missing = lightning_mtkd("fit", "--config", shared, "--model.init_args.teacher=nowhere/teacher.ckpt", *FAST,
                             *SMALL_DATA, cwd=tmp_path)
    assert missing.returncode == 1
    assert "lightning-mtkd: error:" in missing.stderr and "'nowhere/teacher.ckpt' does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr

    wrong = lightning_mtkd("fit", "--config", shared, "--model.init_args.distance=l3", cwd=tmp_path)
    assert wrong.returncode == 2 and "distance" in wrong.stderr  # a bad argument: jsonargparse's usage error
