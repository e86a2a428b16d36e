"""The README's main job (`make demo`) end to end on a tiny budget, so it cannot rot."""

import io

from rich.console import Console

from lightning_mtkd import demo

TINY = {
    "teacher": {"widths": [4, 8, 8], "hidden": 16, "dropout": 0.5, "epochs": 1, "seed": 1},
    "student": {"widths": [2, 4], "hidden": 8, "epochs": 1, "lr": 3e-3},
    "data": {"num_train": 64, "num_val": 32, "num_test": 32, "batch_size": 16},
    "distill": demo.RECIPE["distill"],
    "seed": 1,
}


def test_demo_trains_the_teacher_once_and_prints_the_three_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the student runs' checkpoints go under ./.cache/runs
    first = demo.run(TINY, root=str(tmp_path / "demo"), progress=False)
    assert list(first["rows"]) == ["teacher", "scratch student", "distilled student (SharedDistiller)"]
    for accuracy, params in first["rows"].values():
        assert set(accuracy) == {"left", "right"} and all(0.0 <= a <= 1.0 for a in accuracy.values())
        assert params > 0
    assert first["rows"]["teacher"][1] > first["rows"]["scratch student"][1]
    assert len(list((tmp_path / "demo").glob("teacher-*.ckpt"))) == 1

    second = demo.run(TINY, root=str(tmp_path / "demo"), progress=False)  # reuses the teacher checkpoint
    assert "Reusing teacher checkpoint" in capsys.readouterr().out
    assert second["rows"]["teacher"] == first["rows"]["teacher"]

    console = Console(file=io.StringIO(), width=120)
    demo.print_table(first, console)
    printed = console.file.getvalue()
    assert "distilled student (SharedDistiller)" in printed and "parameters" in printed
