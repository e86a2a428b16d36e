"""TaskSpecificDistiller: one teacher per task, per-task adaptors, per-task KD and feature terms."""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import HEADS, TASKS, conv_net, hook_step, quick_trainer, random_datamodule
from multimnist_teachers import GradProbe, fit_and_measure, mnist_net, mnist_teacher, single_thread  # noqa: F401
from test_cli_configs import SMALL_DATA
from torch import Tensor, nn

from lightning_mtkd import ModelOutputs, MultiTaskModule, TaskSpecificDistiller
from lightning_mtkd.cli import main
from lightning_mtkd.losses.functional import feature_distance, soft_target_kd
from lightning_mtkd.models import Adaptor, ConvBackbone, MultiTaskNet
from lightning_mtkd.teachers import UNSAVED_TEACHER

pytestmark = pytest.mark.usefixtures("single_thread")  # see multimnist_teachers.one_thread


def single_teacher(task: str, hidden: int) -> MultiTaskNet:
    return MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=hidden), {task: 10})


class BareRightTeacher(nn.Module):
    """A single-task teacher that returns a bare Tensor (allowed: it is named after its task)."""

    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(144, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def test_heterogeneous_teachers_adaptors_get_gradients_teachers_none_own_lr(tmp_path):
    L.seed_everything(0)
    teachers = {"left": single_teacher("left", 32), "right": BareRightTeacher(48)}
    before = {name: [p.clone() for p in t.parameters()] for name, t in teachers.items()}
    module = TaskSpecificDistiller(conv_net((2, 4), 8), teachers, TASKS, adaptor_lr=0.05,
                                   teacher_feature={"left": "backbone", "right": "backbone"})
    probe = GradProbe()
    trainer = quick_trainer(tmp_path, max_epochs=1, limit_val_batches=1, callbacks=[probe])
    trainer.fit(module, random_datamodule())

    # one adaptor per task, sized for its own teacher's feature width
    assert {name: a.proj.out_features for name, a in module.adaptors.items()} == {"left": 32, "right": 48}
    assert all(probe.grads[id(p)] for p in module.adaptors.parameters())
    assert all(probe.grads[id(p)] for p in module.model.parameters() if p.dim() > 1)
    for name, teacher in teachers.items():
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before[name], teacher.parameters(), strict=True))
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["adaptors"]["lr"] == 0.05 and groups["model"]["lr"] == 1e-3
    metrics = trainer.callback_metrics
    for task in HEADS:
        expected = {f"train/{task}/kd", f"train/{task}/feat", f"train/{task}/loss", f"val/{task}/teacher_acc"}
        assert expected <= set(metrics)

    path = tmp_path / "ts.ckpt"
    trainer.save_checkpoint(path)
    reloaded = TaskSpecificDistiller.load_from_checkpoint(path, weights_only=True)
    assert reloaded.hparams["teacher"] == {"left": UNSAVED_TEACHER, "right": UNSAVED_TEACHER}
    x = torch.randn(2, 8)
    torch.testing.assert_close(reloaded.adaptors["right"](x), module.adaptors["right"](x))


def test_each_task_is_distilled_from_its_own_teacher_by_hand():
    """kd/<task> and feat/<task> use that task's teacher (here a multi-task teacher for `left` via task_teachers)."""
    torch.manual_seed(0)
    module = TaskSpecificDistiller(conv_net((2, 4), 8), {"mt": conv_net(), "right": single_teacher("right", 24)}, TASKS,
                                   task_teachers={"left": "mt"}, temperature=2.0, feature_weight=0.5, distance="cosine",
                                   student_feature="backbone", teacher_feature="backbone")
    assert module.task_teachers == {"left": "mt", "right": "right"}
    assert {p.adaptor: p.teacher for p in module.feature_pairs()} == {"left": "mt", "right": "right"}
    module.adaptors["left"], module.adaptors["right"] = Adaptor(8, 16), Adaptor(8, 24)
    student = ModelOutputs({t: torch.randn(4, 10) for t in HEADS}, {"backbone": torch.randn(4, 8)})
    teachers = {
        "mt": ModelOutputs({t: torch.randn(4, 10) for t in HEADS}, {"backbone": torch.randn(4, 16)}),
        "right": ModelOutputs({"right": torch.randn(4, 10)}, {"backbone": torch.randn(4, 24)}),
    }
    terms = module.distillation_loss(hook_step(module, student, teachers, {"targets": {}}))
    # the task's own teacher, even where another teacher (listed first) outputs the task too (also for teacher_acc)
    both = {name: ModelOutputs({t: torch.randn(4, 10) for t in HEADS}) for name in ("right", "mt")}
    targets = hook_step(module, student, both, {"targets": {}}).targets
    assert targets["left"] is both["mt"].outputs["left"] and targets["right"] is both["right"].outputs["right"]
    for task, teacher in (("left", "mt"), ("right", "right")):
        expected_kd = soft_target_kd(student.outputs[task], teachers[teacher].outputs[task], 2.0)
        adapted = module.adaptors[task](student.features["backbone"])
        expected_feat = 0.5 * feature_distance(adapted, teachers[teacher].features["backbone"], "cosine")
        torch.testing.assert_close(terms[f"kd/{task}"], expected_kd)
        torch.testing.assert_close(terms[f"feat/{task}"], expected_feat)
    from_wrong_teacher = soft_target_kd(student.outputs["right"], teachers["mt"].outputs["right"], 2.0)
    assert not torch.allclose(terms["kd/right"], from_wrong_teacher)


def test_distillation_terms_fall_on_multimnist(tmp_path):
    L.seed_everything(0)
    teachers = {"left": mnist_teacher(("left",), 32), "right": mnist_teacher(("right",), 48)}
    module = TaskSpecificDistiller(mnist_net((2, 4), 16), teachers, TASKS, alpha=1.0, temperature=2.0)
    before, after = fit_and_measure(module, tmp_path)
    # measured: feat 2.5 → 0.11 and 1.5 → 0.11; kd 0.31 → 0.18 and 0.11 → 0.06 (the student is 30x smaller)
    for task in ("left", "right"):
        assert after[f"val/{task}/feat"] < 0.25 * before[f"val/{task}/feat"]
        assert after[f"val/{task}/kd"] < 0.8 * before[f"val/{task}/kd"]


def test_cli_fits_task_specific_yaml_for_one_step(tmp_path):
    paths = {}
    for task, hidden in (("left", 32), ("right", 24)):
        teacher = MultiTaskModule(MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=hidden), {task: 10}),
                                  [t for t in TASKS if t.name == task])
        trainer = quick_trainer(tmp_path, max_steps=1)
        trainer.fit(teacher, random_datamodule(n=32, shape=(1, 36, 36)))
        paths[task] = tmp_path / f"teacher_{task}.ckpt"
        trainer.save_checkpoint(paths[task])
    config = Path(__file__).parents[1] / "configs" / "multimnist" / "task_specific.yaml"
    teachers = f"--model.init_args.teacher={{left: {paths['left']}, right: {paths['right']}}}"
    cli = main(["fit", "--config", str(config), teachers, "--trainer.fast_dev_run=1",
                f"--trainer.default_root_dir={tmp_path}", *SMALL_DATA])
    assert {"train/left/feat", "train/right/kd"} <= set(cli.trainer.callback_metrics)
    assert cli.model.adaptors["right"].proj.out_features == 24


@pytest.mark.parametrize("name", ["teacher_left.yaml", "teacher_right.yaml"])
def test_single_task_teacher_configs_fit_one_step(name, tmp_path):
    config = Path(__file__).parents[1] / "configs" / "multimnist" / name
    main(["fit", "--config", str(config), "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
          *SMALL_DATA])


# ------------------------------------------------------------------------------ bad input
def test_task_with_no_teacher():
    with pytest.raises(KeyError, match=r"no teacher for task\(s\) \['right'\].*task_teachers"):
        TaskSpecificDistiller(conv_net(), {"left": conv_net()}, TASKS)


def test_teacher_named_after_no_task():
    # With teacher trust (the default) such a teacher is a candidate for the tasks it outputs; without, an error.
    teachers = {"left": conv_net(), "right": conv_net(), "colour": conv_net()}
    with pytest.raises(KeyError, match=r"\['colour'\] teach no task: 'colour' is not a task in `tasks`"):
        TaskSpecificDistiller(conv_net(), teachers, TASKS, teacher_trust=False)
    assert TaskSpecificDistiller(conv_net(), teachers, TASKS).task_teachers == {"left": "left", "right": "right"}


def test_task_teachers_naming_unknown_teacher_or_task():
    with pytest.raises(KeyError, match=r"maps 'left' to teacher 'mt', but the teachers are \['right'\]"):
        TaskSpecificDistiller(conv_net(), {"right": conv_net()}, TASKS, task_teachers={"left": "mt"})
    with pytest.raises(KeyError, match=r"names task 'colour', which is not in `tasks`"):
        TaskSpecificDistiller(conv_net(), {"left": conv_net(), "right": conv_net()}, TASKS,
                              task_teachers={"colour": "left"})


def test_teacher_not_a_dict():
    with pytest.raises(TypeError, match="one teacher per task: pass `teacher` as a dict"):
        TaskSpecificDistiller(conv_net(), conv_net(), TASKS)


def test_teacher_that_does_not_output_its_task(tmp_path):
    module = TaskSpecificDistiller(conv_net(), {"left": single_teacher("right", 16), "right": conv_net()}, TASKS,
                                   teacher_trust=False)
    with pytest.raises(KeyError, match=r"teacher 'left' teaches task 'left' but outputs only \['right'\]"):
        quick_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, random_datamodule())
    module = TaskSpecificDistiller(conv_net(), {"left": single_teacher("right", 16), "right": conv_net()}, TASKS)
    with pytest.raises(KeyError, match=r"teacher 'left' teaches task 'left' but does not output it"):  # trust on
        quick_trainer(tmp_path, max_steps=1, limit_val_batches=1).fit(module, random_datamodule())


def test_teacher_feature_dict_missing_a_teacher():
    with pytest.raises(KeyError, match=r"teacher_feature has no path for teacher\(s\) \['right'\]"):
        TaskSpecificDistiller(conv_net(), {"left": conv_net(), "right": conv_net()}, TASKS,
                              teacher_feature={"left": "backbone"})
