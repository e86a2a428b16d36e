"""The benchmarks' code paths, end to end on a tiny budget, so they cannot rot."""

import importlib.util
import sys
from pathlib import Path

import pytest

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
    # The six strategies, and one row of each other kind: a logit loss, a contrastive hint, the two online ones.
    ROWS = [*quality.DEFAULT_ROWS, "shared-dkd", "hint-crd", "mutual", "self-ema"]
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
            "--rows",
            *ROWS,
        ]
    )
    rows = {entry["row"] for entry in out["summary"]}
    assert rows == {"teacher", *ROWS}
    table = (tmp_path / "quality-multimnist.md").read_text()
    for row in ROWS:
        assert f"| {row} |" in table
    assert (tmp_path / "quality-multimnist.png").stat().st_size > 1000
    single_task = out["result"]["single_task_teachers"]
    assert set(single_task) == {"left", "right"} and all(0 <= acc <= 1 for acc in single_task.values())
    assert f"Single-task teachers (task-specific and fusion): left {100 * single_task['left']:.2f} %" in table
    shared = next(e for e in out["summary"] if e["row"] == "shared")
    assert {"delta_m", "gap_closed", "beats_scratch"} <= set(shared)
    dkd = next(e for e in out["summary"] if e["row"] == "shared-dkd")  # also compared with plain soft targets
    assert dkd["vs_shared"] == pytest.approx(dkd["mean"][0] - shared["mean"][0])
    # The teachers are trained once and reused.
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "multimnist").glob("*.ckpt")) == [
        "teacher",
        "teacher_left",
        "teacher_right",
    ]


def test_quality_compares_each_row_with_its_own_scratch_baseline():
    quality = load("quality")
    rows = {
        "teacher": {"acc": {"left": [0.96], "right": [0.94]}},
        "scratch": {"acc": {"left": [0.90, 0.92], "right": [0.90, 0.92]}},
        "scratch-per-task": {"acc": {"left": [0.80, 0.80], "right": [0.80, 0.80]}},
        "shared": {"acc": {"left": [0.93, 0.93], "right": [0.93, 0.93]}},
        "transfer": {"acc": {"left": [0.85, 0.85], "right": [0.85, 0.85]}},
    }
    for row in rows.values():
        row.update(params=1, latency_ms=0.1)
    summary = {entry["row"]: entry for entry in quality.summarise({"rows": rows})}

    assert "gap_closed" not in summary["scratch"] and "gap_closed" not in summary["scratch-per-task"]
    shared, transfer = summary["shared"], summary["transfer"]
    assert shared["baseline"] == "scratch" and transfer["baseline"] == "scratch-per-task"
    # Gap closed against the row's baseline: (0.93 − 0.91) / (0.95 − 0.91) and (0.85 − 0.80) / (0.95 − 0.80).
    assert abs(shared["gap_closed"] - 0.5) < 1e-9 and abs(transfer["gap_closed"] - 1 / 3) < 1e-9
    assert abs(transfer["delta_m"] - 100 * 0.05 / 0.80) < 1e-9
    # Beats it only by more than either row's seed std (the scratch std is 0.0141).
    assert shared["beats_scratch"] and transfer["beats_scratch"]
    rows["shared"]["acc"] = {"left": [0.915, 0.915], "right": [0.915, 0.915]}
    assert not {e["row"]: e for e in quality.summarise({"rows": rows})}["shared"]["beats_scratch"]


def test_quality_rows_take_levers_and_compare_with_scratch_given_the_same_data(tmp_path):
    quality = load("quality")
    assert quality.parse_row("shared+aug+long") == ("shared", ("aug", "long"))
    assert quality.parse_row("fusion+new") == ("fusion", quality.NEW_DEFAULTS)
    for bad in ("nope", "shared+nope"):
        with pytest.raises(ValueError, match="unknown"):
            quality.parse_row(bad)
    rows = {
        "teacher": {"acc": {"a": [0.96], "b": [0.94]}},
        "scratch": {"acc": {"a": [0.90, 0.90], "b": [0.90, 0.90]}},
        "scratch+aug": {"acc": {"a": [0.92, 0.92], "b": [0.92, 0.92]}},
        "shared+aug": {"acc": {"a": [0.93, 0.93], "b": [0.93, 0.93]}},
    }
    for row in rows.values():
        row.update(params=1, latency_ms=0.1, seconds=2.0)
    result = {"rows": rows, "seeds": [1, 2], "split": "val", "data": "multimnist"}
    summary = {e["row"]: e for e in quality.summarise(result)}
    assert summary["scratch+aug"]["baseline"] == "scratch" and "baseline" not in summary["scratch"]
    assert summary["shared+aug"]["vs_scratch_same"] == ("scratch+aug", pytest.approx(0.01))
    assert abs(summary["shared+aug"]["gap_closed"] - 0.6) < 1e-9
    # The fair comparison: against the scratch student given the same augmented data, it closes a third of its gap.
    same = summary["shared+aug"]["same"]
    assert same["row"] == "scratch+aug" and same["gap_closed"] == pytest.approx(1 / 3) and same["beats"]
    # Regression tasks: an error that falls is a gain in Δm; the mean accuracy is over the classification tasks.
    rows_mae = {
        name: {**row, "acc": {"a": row["acc"]["a"], "mae": [1.0] * len(row["acc"]["a"])}} for name, row in rows.items()
    }
    rows_mae["shared+aug"]["acc"]["mae"] = [0.5, 0.5]
    mae = {
        e["row"]: e
        for e in quality.summarise({**result, "rows": rows_mae, "higher_is_better": {"a": True, "mae": False}})
    }
    assert mae["shared+aug"]["delta_m"] == pytest.approx(100 * (0.03 / 0.90 + 0.5) / 2)
    assert mae["shared+aug"]["mean"][0] == pytest.approx(0.93)
    import json

    single = {"single_task_teachers": {}, "teachers_seconds": 0, "seconds": 1, "workers": 1, "config": {}}
    (tmp_path / "quality-multimnist.json").write_text(json.dumps({**result, **single}))
    text = quality.summary_table(str(tmp_path), ["multimnist", "optdigits"])
    assert "| shared+aug | +1.00 (33%)† ✓ |" in text and "multimnist (val, 2 seed(s))" in text


def test_a_teacher_left_to_train_alone_gets_every_core(monkeypatch):
    quality = load("quality")
    monkeypatch.setattr(quality.os, "cpu_count", lambda: 4)
    assert quality.teacher_threads(3, 2) == [1, 1, 4]
    assert quality.teacher_threads(4, 2) == [1, 1, 1, 1]
    assert quality.teacher_threads(3, 1) == [None, None, None]


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


def test_memory_format_benchmark_times_both_layouts_and_checks_they_agree(tmp_path):
    memory_format = load("memory_format")
    out = tmp_path / "memory_format.md"
    text = memory_format.main(["--batch-size", "4", "--steps", "1", "--repeats", "1", "--out", str(out)])
    assert out.read_text().endswith(text)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| student", "| teacher"))]
    speedups = [row for row in rows if row[1] in ("train", "forward")]
    assert len(speedups) == 4 and all(float(row[2]) > 0 and float(row[3]) > 0 for row in speedups)
    differences = [float(row[2]) for row in rows if row[1] == "max output difference"]
    assert len(differences) == 2 and all(d < 1e-4 for d in differences)


def test_the_mix_lever_is_refused_where_it_cannot_apply_and_its_rows_join_the_summary(tmp_path):
    import json

    quality = load("quality")
    assert quality.parse_row("fusion+new+mix") == ("fusion", (*quality.NEW_DEFAULTS, "mix"))
    for row, message in (("scratch+mix", "no teacher"), ("shared+aug+mix", "one of aug and mix")):
        with pytest.raises(ValueError, match=message):
            quality.build(row, {"levers": {}}, None)
    rows = {
        "teacher": {"acc": {"a": [0.96]}},
        "scratch": {"acc": {"a": [0.90, 0.90]}},
        "shared": {"acc": {"a": [0.92, 0.92]}},
    }
    for row in rows.values():
        row.update(params=1, latency_ms=0.1, seconds=2.0)
    single = {"single_task_teachers": {}, "teachers_seconds": 0, "seconds": 1, "workers": 1, "config": {}}
    result = {"seeds": [1, 2], "split": "test", "data": "multimnist", **single}
    (tmp_path / "quality-multimnist.json").write_text(json.dumps({**result, "rows": rows}))
    mix = {**rows, "shared+mix": {**rows["shared"], "acc": {"a": [0.93, 0.93]}}}
    del mix["shared"]
    (tmp_path / "quality-multimnist-mix.json").write_text(json.dumps({**result, "rows": mix}))
    text = quality.summary_table(str(tmp_path), ["multimnist"])
    assert "| shared | +2.00 (33%) ✓ |" in text and "| shared+mix | +3.00 (50%) ✓ |" in text


def test_schedule_levers_reach_scratch_rows_and_set_the_epochs_the_cosine_decays_over():
    quality = load("quality")
    config = quality.DATASETS["optdigits"]  # a scratch row needs no teachers
    for row, epochs in (("scratch+longer", 120), ("scratch+long", 60), ("scratch", 30)):
        module, how = quality.build(row, config, None)
        assert how["epochs"] == epochs and module.scheduler_factory is None
    module, how = quality.build("scratch+new+cos", config, None)
    assert how["epochs"] == 120 and module.scheduler_factory.keywords["T_max"] == 120  # +new: 4× epochs
    # Compared with the scratch student given the same schedule, spelled as the row spells it.
    assert quality._scratch_with_same_data("fusion+new+cos") == "scratch+new+cos"
    assert quality._scratch_with_same_data("transfer+longer") == "scratch-per-task+longer"
    assert quality._scratch_with_same_data("shared+cos+trust") == "scratch+cos"
    assert quality._scratch_with_same_data("shared+search") is None


def test_the_default_rows_are_the_strategies_plain_and_with_the_new_defaults_where_the_data_can_run_them():
    quality = load("quality")
    images = quality.default_rows(quality.DATASETS["optdigits"])
    assert [row for row in images if row.endswith("+new") and not quality.is_scratch(row)] == [
        f"{strategy}+new" for strategy in quality.STRATEGIES
    ]
    # Every row's scratch baselines are among the defaults, so one run compares each with its own.
    for row in images:
        assert quality.baseline_of(row) in images and quality._scratch_with_same_data(row) in (None, *images)
    tables = quality.default_rows(quality.DATASETS["penguins"])
    assert tables == [row for row in images if not row.startswith("attention")] and len(tables) == len(images) - 2


def test_a_teacher_no_better_than_scratch_leaves_no_gap_to_report_and_no_division_by_zero():
    quality = load("quality")
    rows = {
        "teacher": {"acc": {"a": [0.90]}},
        "scratch": {"acc": {"a": [0.90, 0.90]}},
        "scratch+longer": {"acc": {"a": [0.90, 0.90]}},
        "shared+longer": {"acc": {"a": [0.92, 0.92]}},
    }
    for row in rows.values():
        row.update(params=1, latency_ms=0.1, seconds=2.0)
    summary = {e["row"]: e for e in quality.summarise({"rows": rows})}
    shared = summary["shared+longer"]
    assert "gap_closed" not in shared and shared["same"]["gap_closed"] is None
    assert shared["same"]["delta"] == pytest.approx(0.02) and shared["same"]["beats"]
    config = {"config": {"student": {}, "teacher": {}, "data": {}}}
    single = {"single_task_teachers": {}, "teachers_seconds": 0, "seconds": 1, "workers": 1, **config}
    result = {"rows": rows, "seeds": [1, 2], "split": "test", "data": "multimnist", **single}
    assert "| shared+longer |" in quality.markdown(list(summary.values()), result)
