"""TransferDistiller: one teacher, one small student per task, each loadable and runnable alone."""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TASKS, conv_net, quick_trainer, random_datamodule
from multimnist_teachers import GradProbe, fit_and_measure, mnist_net, mnist_teacher, single_thread  # noqa: F401
from test_cli_configs import SMALL_DATA

from lightning_mtkd import MultiTaskModule, TransferDistiller, load_student
from lightning_mtkd.cli import main
from lightning_mtkd.models import ConvBackbone, MultiTaskNet

pytestmark = pytest.mark.usefixtures("single_thread")  # see multimnist_teachers.one_thread


def task_net(task: str, widths=(2, 4), hidden: int = 8) -> MultiTaskNet:
    return MultiTaskNet(ConvBackbone(widths=widths, hidden=hidden), {task: 10})


def make_transfer(teacher=None, **kwargs) -> TransferDistiller:
    students = {"left": task_net("left", hidden=8), "right": task_net("right", hidden=12)}
    return TransferDistiller(students, teacher if teacher is not None else conv_net((8, 16), 32), TASKS, **kwargs)


def test_students_train_together_and_each_loads_and_runs_alone(tmp_path, teacher_ckpt):
    L.seed_everything(0)
    module = make_transfer(teacher_ckpt, adaptor_lr=0.02)
    teacher = module.teacher  # loaded from its checkpoint
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    probe = GradProbe()
    trainer = quick_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[probe])
    trainer.fit(module, random_datamodule())

    # one teacher pass per batch, shared by both students (+2 at setup: finding the teacher's shared feature, the
    # input of its heads, and the dry run that sizes the adaptors)
    assert len(calls) == 3 + 2
    # one adaptor per student, from its own feature width to the teacher's common feature
    assert {n: (a.proj.in_features, a.proj.out_features) for n, a in module.adaptors.items()} == {
        "left": (8, 32), "right": (12, 32)}
    assert all(probe.grads[id(p)] for p in module.adaptors.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["adaptors"]["lr"] == 0.02
    assert {"train/left/hint", "train/right/hint", "train/left/kd", "train/right/kd"} <= set(trainer.callback_metrics)

    # the checkpoint holds both students (and no teacher); the module reloads from it alone
    path = tmp_path / "transfer.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert any(k.startswith("model.left.") for k in state) and any(k.startswith("model.right.") for k in state)
    assert len(state) == sum(len(part.state_dict()) for part in (module.model, module.adaptors, module.extras))
    reloaded = TransferDistiller.load_from_checkpoint(path, weights_only=True)

    module.eval()
    x = torch.randn(5, 1, 12, 12)
    inside = module(x)
    for task in ("left", "right"):
        exported = module.export_student(task, tmp_path / f"{task}.ckpt")
        alone = load_student(exported).eval()
        assert type(alone) is MultiTaskNet and list(alone.heads) == [task]  # the other student is not in it
        assert sum(p.numel() for p in alone.parameters()) == sum(p.numel() for p in module.student(task).parameters())
        torch.testing.assert_close(alone(x)[task], inside[task])
        torch.testing.assert_close(reloaded.eval()(x)[task], inside[task])
        # an exported student is an ordinary MultiTaskModule checkpoint (it can even teach)
        assert isinstance(MultiTaskModule.load_from_checkpoint(exported, weights_only=True), MultiTaskModule)


def test_a_student_for_a_group_of_tasks(tmp_path):
    module = TransferDistiller({"digits": conv_net((2, 4), 8)}, conv_net(), TASKS, groups={"digits": ["left", "right"]})
    trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, random_datamodule())
    assert list(module.adaptors) == ["digits"] and "train/digits/hint" in trainer.callback_metrics
    student = load_student(module.export_student("digits", tmp_path / "digits.ckpt"))
    assert set(student(torch.randn(2, 1, 12, 12))) == {"left", "right"}


def test_distillation_terms_fall_on_multimnist(tmp_path):
    L.seed_everything(0)
    students = {"left": mnist_net((2, 4), 16, ("left",)), "right": mnist_net((4, 8), 16, ("right",))}
    module = TransferDistiller(students, mnist_teacher(), TASKS, alpha=1.0, temperature=2.0)
    before, after = fit_and_measure(module, tmp_path)
    for task in ("left", "right"):
        assert after[f"val/{task}/hint"] < 0.25 * before[f"val/{task}/hint"], (before, after)
        assert after[f"val/{task}/kd"] < 0.8 * before[f"val/{task}/kd"], (before, after)


def test_cli_fits_transfer_yaml_for_one_step(tmp_path):
    teacher = MultiTaskModule(conv_net((8, 16), 32), TASKS)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(teacher, random_datamodule(n=32, shape=(1, 36, 36)))
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    config = Path(__file__).parents[1] / "configs" / "multimnist" / "transfer.yaml"
    cli = main(["fit", "--config", str(config), f"--model.init_args.teacher={path}", "--trainer.fast_dev_run=1",
                f"--trainer.default_root_dir={tmp_path}", *SMALL_DATA])
    assert {"train/left/hint", "train/right/hint"} <= set(cli.trainer.callback_metrics)
    exported = cli.model.export_student("right", tmp_path / "right.ckpt")  # students built by the CLI export too
    assert list(load_student(exported).heads) == ["right"]


# ------------------------------------------------------------------------------ bad input
def test_student_dict_missing_a_task():
    with pytest.raises(KeyError, match=r"no student for task\(s\) \['right'\].*Add a student named after each"):
        TransferDistiller({"left": task_net("left")}, conv_net(), TASKS)


def test_student_named_after_no_task():
    with pytest.raises(KeyError, match=r"student 'colour' is named after \['colour'\], not a task in `tasks`"):
        TransferDistiller({"left": task_net("left"), "right": task_net("right"), "colour": task_net("left")},
                          conv_net(), TASKS)


def test_task_given_to_two_students():
    with pytest.raises(KeyError, match=r"predicted by several students: \{'left': \['left', 'both'\]\}"):
        TransferDistiller({"left": task_net("left"), "both": conv_net()}, conv_net(), TASKS,
                          groups={"both": ["left", "right"]})


def test_student_not_a_dict():
    with pytest.raises(TypeError, match=r"one student per task: pass `student` as a dict"):
        TransferDistiller(conv_net(), conv_net(), TASKS)


def test_student_missing_the_head_of_its_task(tmp_path):
    module = TransferDistiller({"left": task_net("right"), "right": task_net("right")}, conv_net(), TASKS)
    with pytest.raises(KeyError, match=r"student 'left' outputs no \['left'\] \(it outputs \['right'\]\)"):
        quick_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, random_datamodule())


def test_unknown_student_to_export(tmp_path):
    with pytest.raises(KeyError, match=r"no student 'colour'; the students are \['left', 'right'\]"):
        make_transfer().export_student("colour", tmp_path / "x.ckpt")
