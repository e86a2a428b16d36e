"""Every YAML config parses; the small ones fit through the CLI."""

from pathlib import Path

import pytest
from conftest import TASKS, conv_net, quick_trainer, random_datamodule

from lightning_mtkd import MultiTaskModule
from lightning_mtkd.cli import main

CONFIGS = sorted(str(p) for p in Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))


def test_there_are_configs():
    assert any(c.endswith("shared.yaml") for c in CONFIGS)


#: Fragments added after a run's config (`--config run.yaml --config logger/wandb.yaml`): built on top of shared.yaml.
FRAGMENT_DIRS = ("logger",)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: Path(c).name)
def test_config_parses_and_builds(config, tmp_path, monkeypatch):
    if Path(config).parent.name in FRAGMENT_DIRS:
        monkeypatch.chdir(tmp_path)  # a logger may create its directory when built
        base = str(Path(__file__).parents[1] / "configs" / "multimnist" / "shared.yaml")
        cli = main(["--config", base, "--config", config], run=False)
        assert cli.trainer.logger is not None
    else:
        cli = main(["--config", config, "--trainer.logger=false"], run=False)
    assert isinstance(cli.model, MultiTaskModule)


SMALL_DATA = [
    "--data.init_args.num_train=64",
    "--data.init_args.num_val=32",
    "--data.init_args.num_test=32",
    "--data.init_args.batch_size=16",
]


@pytest.mark.parametrize("name", ["teacher.yaml", "scratch.yaml"])
def test_training_configs_fit_one_step(name, tmp_path):
    config = Path(__file__).parents[1] / "configs" / "multimnist" / name
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}"]
    main([*args, *SMALL_DATA])


def test_cli_fits_shared_yaml_for_one_step(tmp_path):
    teacher = MultiTaskModule(conv_net((8, 16), 32), TASKS)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(teacher, random_datamodule(shape=(1, 36, 36)))
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    config = Path(__file__).parents[1] / "configs" / "multimnist" / "shared.yaml"
    cli = main(
        [
            "fit",
            "--config",
            str(config),
            f"--model.init_args.teacher={path}",
            "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={tmp_path}",
            *SMALL_DATA,
        ]
    )
    assert "train/hint" in cli.trainer.callback_metrics


def test_unknown_distance_fails_at_parse(tmp_path, capsys):
    config = Path(__file__).parents[1] / "configs" / "multimnist" / "shared.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.init_args.distance=l3"], run=False)
    assert "l3" in capsys.readouterr().err


def test_cli_adds_the_nonfinite_guard_by_default():
    from lightning_mtkd.callbacks import NonFiniteLossGuard

    config = Path(__file__).parents[1] / "configs" / "multimnist" / "scratch.yaml"
    cli = main(["--config", str(config), "--trainer.logger=false", "--guard.policy=skip"], run=False)
    guards = [cb for cb in cli.trainer.callbacks if isinstance(cb, NonFiniteLossGuard)]
    assert len(guards) == 1 and guards[0].policy == "skip"
