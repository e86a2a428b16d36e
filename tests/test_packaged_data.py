"""The data sets read from inside installed packages: penguins, abalone and the two-digit UCI composites."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_mtkd.cli import main
from lightning_mtkd.data import AbaloneDataModule, MultiOptDigitsDataModule, PenguinsDataModule
from lightning_mtkd.data.optdigits import load_sklearn_digits, upsample_digits

CONFIGS = Path(__file__).parents[1] / "configs"
TABLES = [PenguinsDataModule, AbaloneDataModule]


def ready(dm):
    dm.setup()
    return dm


def package_table(cls):
    """The package's own table, read here without the module, as the independent reference."""
    if cls is PenguinsDataModule:
        from palmerpenguins import load_penguins

        return load_penguins()
    from sklego.datasets import load_abalone

    return load_abalone(as_frame=True)


# --------------------------------------------------------------------------------------------- batches


def test_penguins_batch():
    batch = next(iter(ready(PenguinsDataModule(batch_size=16)).train_dataloader()))
    assert batch["input"].shape == (16, 6) and batch["input"].dtype == torch.float32
    assert batch["targets"]["species"].dtype == torch.long and batch["targets"]["species"].shape == (16,)
    assert batch["targets"]["sex"].dtype == torch.long and batch["targets"]["sex"].shape == (16,)
    assert batch["targets"]["body_mass"].dtype == torch.float32 and batch["targets"]["body_mass"].shape == (16, 1)
    assert batch["index"].dtype == torch.long


def test_abalone_batch():
    dm = ready(AbaloneDataModule(batch_size=32))
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (32, 7) and batch["input"].dtype == torch.float32
    assert batch["targets"]["sex"].dtype == torch.long and set(batch["targets"]["sex"].tolist()) <= {0, 1, 2}
    assert batch["targets"]["rings"].dtype == torch.float32 and batch["targets"]["rings"].shape == (32, 1)
    assert dm.num_classes == {"sex": 3, "rings": 1} and dm.in_features == 7


def test_optdigits_batch():
    dm = ready(MultiOptDigitsDataModule(num_train=40, num_val=8, num_test=8, batch_size=16))
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (16, 1, 28, 28) and batch["input"].dtype == torch.float32
    assert batch["input"].min() >= 0 and batch["input"].max() <= 1
    for task in ("left", "right"):
        labels = batch["targets"][task]
        assert labels.dtype == torch.long and labels.shape == (16,) and labels.min() >= 0 and labels.max() <= 9


# ---------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("cls", TABLES, ids=lambda c: c.__name__)
def test_table_splits_are_disjoint_complete_and_seeded(cls):
    a, b, other = ready(cls(seed=3)), ready(cls(seed=3)), ready(cls(seed=4))
    rows = {split: set(a.rows[split].tolist()) for split in ("train", "val", "test")}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    kept = 342 if cls is PenguinsDataModule else 4177  # penguins: the 2 birds without measurements are left out
    assert sum(len(r) for r in rows.values()) == kept
    for split in rows:
        assert torch.equal(a.rows[split], b.rows[split])
        torch.testing.assert_close(a.splits[split].inputs, b.splits[split].inputs)
    assert not torch.equal(a.rows["test"], other.rows["test"])


def test_optdigits_pools_are_disjoint_and_seeded():
    """Trace each composite's left digit back to its source: unscaled, unshifted far enough not to overlap."""
    images, _ = load_sklearn_digits()
    by_bytes = {digit.tobytes(): i for i, digit in enumerate(upsample_digits(images, 1))}

    def sources(dm, split):
        corner = (dm.splits[split].inputs[:, 0, :8, :8] * 255).round().to(torch.uint8).numpy()
        return {by_bytes[c.tobytes()] for c in corner}

    kwargs = dict(num_train=600, num_val=200, num_test=200, train_digits=900, val_digits=300, test_digits=500)
    dm = ready(MultiOptDigitsDataModule(scale=1, shift=8, seed=0, **kwargs))
    train, val, test = (sources(dm, split) for split in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert len(train) > 300 and len(test) > 150
    same = ready(MultiOptDigitsDataModule(scale=1, shift=8, seed=0, **kwargs))
    other = ready(MultiOptDigitsDataModule(scale=1, shift=8, seed=1, **kwargs))
    torch.testing.assert_close(dm.splits["test"].inputs, same.splits["test"].inputs)
    assert sources(other, "test") != test


def test_upsampled_digits_keep_the_ink_scale():
    images, _ = load_sklearn_digits()
    up = upsample_digits(images[:5], 3)
    assert up.shape == (5, 24, 24) and up.dtype == np.uint8
    # Bilinear upsampling averages neighbours: the mean ink is kept up to the border effects.
    np.testing.assert_allclose(up.mean(axis=(1, 2)) / 255, images[:5].mean(axis=(1, 2)) / 16, atol=0.02)


# ------------------------------------------------------------------------------- labels and statistics


def test_penguins_missing_sex_is_the_ignore_label():
    dm = ready(PenguinsDataModule())
    frame = package_table(PenguinsDataModule)
    for split, dataset in dm.splits.items():
        unsexed = torch.from_numpy(frame["sex"].isna().to_numpy()[dm.rows[split].numpy()])
        assert torch.equal(dataset.targets["sex"] == -100, unsexed)
    assert sum(int((d.targets["sex"] == -100).sum()) for d in dm.splits.values()) == 9


def test_hidden_regression_labels_are_nan():
    dm = ready(PenguinsDataModule(hide_labels={"body_mass": 0.5}))
    assert int(dm.splits["train"].targets["body_mass"].isnan().sum()) == round(0.5 * len(dm.splits["train"]))
    assert not dm.splits["val"].targets["body_mass"].isnan().any()


def test_penguins_standardisation_uses_training_rows_only():
    dm = ready(PenguinsDataModule(seed=5))
    frame = package_table(PenguinsDataModule)
    measured = list(PenguinsDataModule.MEASUREMENTS)
    raw = {split: frame.iloc[dm.rows[split].numpy()] for split in dm.rows}
    train = torch.tensor(raw["train"][measured].to_numpy(), dtype=torch.float32)
    mean, std = train.mean(0), train.std(0, unbiased=False)
    torch.testing.assert_close(dm.feature_mean[:3], mean)
    torch.testing.assert_close(dm.feature_std[:3], std)
    val = torch.tensor(raw["val"][measured].to_numpy(), dtype=torch.float32)
    torch.testing.assert_close(dm.splits["val"].inputs[:, :3], (val - mean) / std)
    islands = dm.splits["val"].inputs[:, 3:]  # the one-hot columns stay 0/1, one island per bird
    assert set(islands.unique().tolist()) == {0.0, 1.0} and torch.equal(islands.sum(1), torch.ones(len(islands)))
    mass = {split: torch.tensor(raw[split]["body_mass_g"].to_numpy(), dtype=torch.float32) for split in raw}
    assert dm.target_mean["body_mass"] == pytest.approx(mass["train"].mean().item())
    assert dm.target_std["body_mass"] == pytest.approx(mass["train"].std(unbiased=False).item())
    expected = (mass["test"] - dm.target_mean["body_mass"]) / dm.target_std["body_mass"]
    torch.testing.assert_close(dm.splits["test"].targets["body_mass"][:, 0], expected)


def test_abalone_standardisation_uses_training_rows_only():
    dm = ready(AbaloneDataModule(seed=2))
    frame = package_table(AbaloneDataModule)
    train = torch.tensor(frame.iloc[dm.rows["train"].numpy()][list(AbaloneDataModule.MEASUREMENTS)].to_numpy())
    torch.testing.assert_close(dm.feature_mean, train.float().mean(0))
    rings = torch.tensor(frame["rings"].to_numpy(), dtype=torch.float32)
    assert dm.target_mean["rings"] == pytest.approx(rings[dm.rows["train"]].mean().item())
    assert dm.target_mean["rings"] != pytest.approx(rings[dm.rows["val"]].mean().item())
    restored = dm.splits["val"].targets["rings"][:, 0] * dm.target_std["rings"] + dm.target_mean["rings"]
    torch.testing.assert_close(restored, rings[dm.rows["val"]])


# ----------------------------------------------------------------------------------------------- errors


def test_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        PenguinsDataModule(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="1,797"):
        MultiOptDigitsDataModule(train_digits=1500, val_digits=300)
    with pytest.raises(ValueError, match="shift"):
        MultiOptDigitsDataModule(scale=1, shift=9)


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "palmerpenguins", None)  # makes `import palmerpenguins` fail, as when absent
    with pytest.raises(ImportError, match="pip install palmerpenguins"):
        PenguinsDataModule().setup()


# ---------------------------------------------------------------------------------------------- configs

SMALL_IMAGES = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]
PACKAGED_CONFIGS = [(name, role) for name in ("penguins", "abalone", "optdigits") for role in ("teacher", "scratch")]


@pytest.mark.parametrize(("name", "role"), PACKAGED_CONFIGS, ids=lambda v: v)
def test_config_matches_its_data_and_fits_one_step(name, role, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' checkpoint folders are relative
    config = str(CONFIGS / name / f"{role}.yaml")
    small = SMALL_IMAGES if name == "optdigits" else []
    built = main(["--config", config, "--trainer.logger=false", *small], run=False)
    dm, model = built.datamodule, built.model
    dm.setup()
    widths = {task: t.num_classes for task, t in model.tasks.items()}
    outputs = model.model(next(iter(dm.train_dataloader()))["input"])
    assert {task: out.shape[1] for task, out in outputs.items()} == widths
    if name != "optdigits":  # the tables report their widths: the config's MLP and heads must match them
        assert model.model.backbone.layers[1].in_features == dm.in_features and dm.num_classes == widths
    args = ["fit", "--config", config, "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}"]
    cli = main([*args, *small])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
