"""The benchmarks' code paths, end to end on a tiny budget, so they cannot rot."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_runs_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch):
    # Imported by name from sys.path (not from a file location) so that its worker processes can import it too.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    quality = importlib.import_module("quality")
    out = quality.main(
        [
            "--workers",
            "2",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--teacher-epochs",
            "1",
            "--num-train",
            "64",
            "--root",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path),
        ]
    )
    rows = {entry["row"] for entry in out["summary"]}
    assert rows == {"teacher", *quality.ROWS}
    table = (tmp_path / "quality.md").read_text()
    for row in quality.ROWS:
        assert f"| {row} |" in table
    assert (tmp_path / "quality.png").stat().st_size > 1000
    shared = next(e for e in out["summary"] if e["row"] == "shared")
    assert {"delta_m", "gap_closed", "beats_scratch"} <= set(shared)
    # The teachers are trained once and reused.
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.ckpt")) == [
        "teacher",
        "teacher_left",
        "teacher_right",
    ]


def test_pseudo_label_benchmark_runs_end_to_end_on_a_tiny_budget(tmp_path):
    pseudo_labels = load("pseudo_labels")
    argv = ["--seeds", "1", "2", "--epochs", "1", "--num-train", "64", "--root", str(tmp_path / "cache")]
    out = pseudo_labels.main([*argv, "--out", str(tmp_path)])
    assert set(out["rows"]) == set(pseudo_labels.ROWS)
    for row in pseudo_labels.ROWS:
        assert set(out["rows"][row]) == {1, 2}
        assert all(0 <= acc <= 100 for seed in (1, 2) for acc in out["rows"][row][seed].values())
    table = (tmp_path / "pseudo_labels.md").read_text()
    assert "| mean ± std |" in table and "right (pseudo-labels)" in table and "Pseudo-labels (the teacher" in table
    assert 0 <= out["pseudo_label_accuracy"] <= 100
    # One teacher, trained once on the partially labelled data for both rows and seeds.
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.ckpt")] == ["teacher_partial"]
