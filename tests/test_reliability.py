"""Exact resume and DDP parity, for every strategy in STRATEGIES."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TASKS, conv_net, quick_trainer, random_datamodule
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mtkd import MultiTaskModule, SharedDistiller


def teacher_net():
    torch.manual_seed(123)  # the same teacher weights in every process and every run
    return conv_net((8, 16), 32).eval()


def make_scratch():
    return MultiTaskModule(conv_net((4, 8), 16), TASKS)


def make_shared():
    return SharedDistiller(conv_net((4, 8), 16), teacher_net(), TASKS, adaptor_lr=3e-3)


#: Factories at module scope, so ddp_spawn can pickle them.
STRATEGIES = {"scratch": make_scratch, "shared": make_shared}


def _fit(factory, tmp_path, epochs, ckpt_path=None, **kwargs):
    L.seed_everything(7)
    module = factory()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = quick_trainer(
        tmp_path, max_epochs=epochs, deterministic=True, enable_checkpointing=True, callbacks=[checkpoint], **kwargs
    )
    trainer.fit(module, random_datamodule(n=64, batch_size=16, seed=3), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resume_from_last_checkpoint_is_exact(name, tmp_path):
    factory = STRATEGIES[name]
    straight, straight_trainer = _fit(factory, tmp_path / "straight", epochs=3)
    _fit(factory, tmp_path / "interrupted", epochs=2)
    resumed, resumed_trainer = _fit(factory, tmp_path / "interrupted", epochs=3, ckpt_path="last")

    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{key} differs after resume"
    opt_a = straight_trainer.optimizers[0].state_dict()
    opt_b = resumed_trainer.optimizers[0].state_dict()
    for state_a, state_b in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    for key in ("val/loss", "val/left/acc", "train/loss_epoch"):
        assert torch.equal(straight_trainer.callback_metrics[key], resumed_trainer.callback_metrics[key]), key


@pytest.mark.ddp
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_ddp_two_cpu_processes_match_a_single_process_evaluation(name, tmp_path):
    module, trainer = _fit(STRATEGIES[name], tmp_path, epochs=1, strategy="ddp_spawn", devices=2)
    synced = {k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    single = quick_trainer(tmp_path, devices=1)
    single.validate(module, random_datamodule(n=64, batch_size=16, seed=3), verbose=False)
    for key in ("val/left/acc", "val/right/acc", "val/loss"):
        torch.testing.assert_close(synced[key], single.callback_metrics[key], msg=key)

    reloaded = type(module).load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True, **_teacher_kwargs(module))
    x = torch.randn(4, 1, 12, 12)
    module.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(x)["left"], module(x)["left"])


def _teacher_kwargs(module):
    return {"teacher": teacher_net()} if hasattr(module, "teachers") else {}


def test_student_checkpoint_is_small_and_works_without_its_moved_teacher(tmp_path, teacher_ckpt):
    module = SharedDistiller(conv_net((2, 4), 8), teacher_ckpt, TASKS)
    trainer = quick_trainer(tmp_path, max_epochs=1)
    dm = random_datamodule()
    trainer.fit(module, dm)
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    assert path.stat().st_size < (tmp_path / "teacher.ckpt").stat().st_size

    moved = tmp_path / "elsewhere.ckpt"
    (tmp_path / "teacher.ckpt").rename(moved)
    student = SharedDistiller.load_from_checkpoint(path, weights_only=True)
    with pytest.warns(UserWarning, match="not available"):
        result = quick_trainer(tmp_path).test(student, dm, verbose=False)[0]
    assert "test/left/acc" in result and "test/left/teacher_acc" not in result
    predictions = quick_trainer(tmp_path).predict(student, dm)
    assert set(predictions[0]) == {"left", "right"}
    with pytest.raises(FileNotFoundError, match="teacher.ckpt' does not exist"):
        quick_trainer(tmp_path).fit(student, dm)
