"""The adaptive and attention configs fit for one step through the CLI; every weighting plug-in fits from a config."""

from pathlib import Path

import pytest
from conftest import TASKS, conv_net, quick_trainer, random_datamodule
from test_cli_configs import SMALL_DATA

from lightning_mtkd import MultiTaskModule
from lightning_mtkd.cli import main
from lightning_mtkd.models import MultiTaskNet, PatchTransformerBackbone

CONFIGS = Path(__file__).parents[1] / "configs" / "multimnist"
WEIGHTINGS = ["UncertaintyWeighting", "DynamicWeightAverage", "GradNorm", "TeacherAnnealing"]


def fit_args(name, tmp_path, *extra):
    config = str(CONFIGS / name)
    return ["fit", "--config", config, "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
            *SMALL_DATA, *extra]


@pytest.fixture(scope="module")
def conv_teacher(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("conv_teacher")
    trainer = quick_trainer(root, max_steps=1)
    trainer.fit(MultiTaskModule(conv_net((8, 16), 32), TASKS), random_datamodule(n=32, shape=(1, 36, 36)))
    trainer.save_checkpoint(root / "teacher.ckpt")
    return str(root / "teacher.ckpt")


@pytest.fixture(scope="module")
def transformer_teacher(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("vit_teacher")
    net = MultiTaskNet(PatchTransformerBackbone(image_size=36, patch_size=6, dim=64, depth=4, heads=4), {"left": 10,
                                                                                                       "right": 10})
    trainer = quick_trainer(root, max_steps=1)
    trainer.fit(MultiTaskModule(net, TASKS), random_datamodule(n=32, shape=(1, 36, 36)))
    trainer.save_checkpoint(root / "teacher.ckpt")
    return str(root / "teacher.ckpt")


def test_transformer_teacher_config_fits_one_step(tmp_path):
    main(fit_args("teacher_transformer.yaml", tmp_path))


def test_attention_config_fits_one_step(tmp_path, conv_teacher):
    cli = main(fit_args("attention.yaml", tmp_path, f"--model.init_args.teacher={conv_teacher}"))
    assert "train/attention" in cli.trainer.callback_metrics


def test_attention_transformer_config_fits_one_step(tmp_path, transformer_teacher):
    cli = main(fit_args("attention_transformer.yaml", tmp_path, f"--model.init_args.teacher={transformer_teacher}"))
    assert cli.model.kinds == ["weights", "weights"]
    assert cli.trainer.callback_metrics["train/attention"] > 0


def test_adaptive_config_fits_one_step_and_updates_weights(tmp_path, conv_teacher):
    cli = main(fit_args("adaptive.yaml", tmp_path, f"--model.init_args.teacher={conv_teacher}",
                        "--model.init_args.adaptive_temperature=true"))
    for task in ("left", "right"):
        assert f"val/{task}/kd_weight" in cli.trainer.callback_metrics
        assert f"val/{task}/kd_temperature" in cli.trainer.callback_metrics


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_each_weighting_plugin_fits_one_step_from_a_config(weighting, tmp_path, conv_teacher):
    cli = main(fit_args("shared.yaml", tmp_path, f"--model.init_args.teacher={conv_teacher}",
                        f"--model.init_args.weighting=lightning_mtkd.weighting.{weighting}"))
    assert type(cli.model.weighting).__name__ == weighting
    assert "train/left/weight" in cli.trainer.callback_metrics


def test_a_weighting_plugin_trains_a_teacher_from_a_config(tmp_path):
    cli = main(fit_args("teacher.yaml", tmp_path, "--model.init_args.weighting=lightning_mtkd.weighting.GradNorm",
                        "--model.init_args.weighting.init_args.alpha=0.5"))
    assert cli.model.weighting.shared_layer_name == "backbone.neck.2"


def test_unknown_weighting_fails_at_parse(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "shared.yaml"),
              "--model.init_args.weighting=lightning_mtkd.weighting.NoSuchWeighting"], run=False)
    assert "NoSuchWeighting" in capsys.readouterr().err


def test_unknown_attention_loss_fails_at_parse(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "attention.yaml"), "--model.init_args.attention_loss=l2"], run=False)
    assert "l2" in capsys.readouterr().err
