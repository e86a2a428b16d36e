"""The shared step and teacher hygiene, through SharedDistiller (the base's behaviour is the same for all)."""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import HEADS, TASKS, conv_net, quick_trainer, random_datamodule

from lightning_mtkd import DistillationModule, MultiTaskModule, SharedDistiller, Task
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.models import ConvBackbone, MultiTaskNet
from lightning_mtkd.teachers import UNSAVED_TEACHER


def make_distiller(teacher, **kwargs):
    return SharedDistiller(conv_net((2, 4), 8), teacher, TASKS, **kwargs)


def test_teacher_is_frozen_unchanged_in_eval_and_outside_optimizer_and_checkpoint(tmp_path):
    L.seed_everything(0)
    teacher = conv_net((8, 16), 32)
    teacher.train()  # even a teacher handed over in train mode is put in eval mode
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = make_distiller(teacher)
    trainer = quick_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, random_datamodule())

    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights or BN buffers changed"
    assert not teacher.training and not any(m.training for m in teacher.modules())
    module.train()
    assert not teacher.training, "train() must not put the teacher back in training mode"
    assert all(not p.requires_grad for p in teacher.parameters())

    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in module.model.parameters()} <= optimised

    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    teacher_tensors = {t.data_ptr() for t in teacher.state_dict().values()}
    assert not any(k.startswith("teacher") for k in checkpoint["state_dict"])
    trained = [module.model, module.adaptors, module.extras]
    assert len(checkpoint["state_dict"]) == sum(len(part.state_dict()) for part in trained)
    assert checkpoint["hyper_parameters"]["teacher"] == UNSAVED_TEACHER  # a module teacher is never pickled in

    reloaded = SharedDistiller.load_from_checkpoint(path, weights_only=True)
    with pytest.warns(UserWarning, match="not available"):
        assert "test/left/acc" in quick_trainer(tmp_path).test(reloaded, random_datamodule(), verbose=False)[0]
    with pytest.raises(RuntimeError, match="loaded from a checkpoint of a teacher given as a module"):
        quick_trainer(tmp_path).fit(reloaded, random_datamodule())
    assert teacher_tensors  # (sanity)


def test_distillation_trains_student_and_adaptor_and_reloads(tmp_path, teacher_ckpt):
    L.seed_everything(0)
    module = make_distiller(teacher_ckpt, adaptor_lr=0.02)
    student_before = [p.clone() for p in module.model.parameters()]
    trainer = quick_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, random_datamodule())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, module.model.parameters(), strict=True))
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["adaptors"]["lr"] == 0.02 and groups["model"]["lr"] == 1e-3
    assert "val/left/teacher_acc" in trainer.callback_metrics and "train/hint" in trainer.callback_metrics

    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SharedDistiller.load_from_checkpoint(path, weights_only=True)
    x = torch.randn(3, 1, 12, 12)
    module.eval()
    reloaded.eval()
    for task in HEADS:
        torch.testing.assert_close(reloaded(x)[task], module(x)[task])
    torch.testing.assert_close(reloaded.adaptors["hint"](torch.ones(2, 8)), module.adaptors["hint"](torch.ones(2, 8)))


def test_adaptor_sized_for_mismatched_widths(tmp_path):
    teacher = MultiTaskNet(ConvBackbone(widths=(8, 16), hidden=48), HEADS)
    module = SharedDistiller(
        conv_net((2, 4), 8), teacher, TASKS, student_feature="backbone.features", teacher_feature="backbone.features"
    )
    quick_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, random_datamodule())
    proj = module.adaptors["hint"].proj
    assert isinstance(proj, torch.nn.Conv2d) and (proj.in_channels, proj.out_channels) == (4, 16)


def test_partially_missing_and_all_missing_labels_train_without_nan(tmp_path):
    torch.manual_seed(0)
    inputs = torch.randn(32, 1, 12, 12)
    targets = {"left": torch.randint(0, 10, (32,)), "right": torch.full((32,), -100)}
    targets["left"][::2] = -100
    dataset = MultiTaskDataset(inputs, targets)
    dm = MultiTaskDataModule(dataset, dataset, batch_size=8)
    module = make_distiller(conv_net((4, 8), 16))
    trainer = quick_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_epoch"]) and metrics["train/right/loss"].item() == 0.0
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_kd_term_falls_and_student_approaches_teacher(tmp_path):
    """The student learns the teacher's soft targets: the KD term falls over a few hundred steps."""
    L.seed_everything(0)
    teacher = conv_net((8, 16), 32).eval()
    module = SharedDistiller(conv_net((4, 8), 16), teacher, TASKS, alpha=1.0, hint_weight=0.0, temperature=2.0)
    dm = random_datamodule(n=256, batch_size=32)
    trainer = quick_trainer(tmp_path, max_epochs=1, limit_val_batches=1)
    trainer.validate(module, dm, verbose=False)
    first = trainer.callback_metrics["val/left/kd"].item()
    trainer = quick_trainer(tmp_path, max_epochs=25, limit_val_batches=1)
    trainer.fit(module, dm)
    assert trainer.callback_metrics["val/left/kd"].item() < 0.5 * first


def test_custom_strategy_overrides_one_hook(tmp_path):
    class CosineLogitDistiller(DistillationModule):
        def distillation_loss(self, step):
            return {
                f"cos/{t}": (1 - torch.cosine_similarity(step.student.outputs[t], step.targets[t])).mean()
                for t in self.tasks
            }

    module = CosineLogitDistiller(conv_net((2, 4), 8), conv_net((4, 8), 16), TASKS)
    trainer = quick_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, random_datamodule())
    assert "val/left/cos" in trainer.callback_metrics


def test_multitask_module_trains_and_reloads_from_python(tmp_path):
    module = MultiTaskModule(conv_net(), TASKS)
    trainer = quick_trainer(tmp_path, max_steps=2)
    trainer.fit(module, random_datamodule())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    reloaded = MultiTaskModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert reloaded.tasks == module.tasks
    assert isinstance(reloaded.tasks["left"], Task)


def test_a_distilled_student_checkpoint_can_teach(tmp_path, teacher_ckpt):
    module = make_distiller(teacher_ckpt)
    trainer = quick_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, random_datamodule())
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    from lightning_mtkd import load_teacher

    network = load_teacher(str(tmp_path / "student.ckpt"))
    x = torch.randn(2, 1, 12, 12)
    module.eval()
    torch.testing.assert_close(network.eval()(x)["left"], module(x)["left"])


def test_checkpoints_written_before_the_base_redesign_still_load():
    """Files written by lightning-mtkd 0.1 before the redesign (tests/fixtures, made by its own code): the hint
    adaptor and the learned fusion gates (now under `extras.`) come back, and the students give the same outputs."""
    from lightning_mtkd import FusionDistiller
    from lightning_mtkd.models import MLPBackbone

    fixtures = Path(__file__).parent / "fixtures"
    expected = torch.load(fixtures / "legacy-0.1-expected.pt", weights_only=True)
    def net(hidden):
        return MultiTaskNet(MLPBackbone(in_features=6, hidden=(hidden,)), {"a": 3, "b": 2})

    shared = SharedDistiller.load_from_checkpoint(
        fixtures / "legacy-0.1-shared.ckpt", weights_only=True, teacher=net(8)
    )
    assert shared.adaptors["hint"].proj.in_features == 4
    fusion = FusionDistiller.load_from_checkpoint(
        fixtures / "legacy-0.1-fusion-learned.ckpt", weights_only=True, teacher={"x": net(8), "y": net(5)}
    )
    torch.testing.assert_close(fusion.extras["a"](torch.ones(1, 6)), expected["gate_a"])
    for name, module in (("shared", shared), ("fusion", fusion)):
        got = module.model.eval()(expected["x"])
        for task in ("a", "b"):
            torch.testing.assert_close(got[task], expected[name][task])


def test_distillation_module_is_still_importable_from_its_old_module():
    """`DistillationModule` moved from strategies/base.py to strategies/distillation.py; user code (and anything
    that records a class path) naming the old place gets the same class, and other names still fail there."""
    import lightning_mtkd.strategies.base as base
    from lightning_mtkd.strategies.distillation import DistillationModule

    assert base.DistillationModule is DistillationModule
    with pytest.raises(AttributeError, match="no attribute 'NoSuchModule'"):
        base.NoSuchModule  # noqa: B018
