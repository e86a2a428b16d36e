"""Exact resume and DDP parity, for every strategy in STRATEGIES."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from conftest import TASKS, conv_net, quick_trainer, random_datamodule
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_mtkd import (
    AdaptiveDistiller,
    AttentionDistiller,
    AttentionPair,
    FusionDistiller,
    MultiTaskModule,
    MutualDistiller,
    SelfDistiller,
    SharedDistiller,
    TaskSpecificDistiller,
    TransferDistiller,
)
from lightning_mtkd.callbacks import TeacherCache
from lightning_mtkd.models import ConvBackbone, MultiTaskNet
from lightning_mtkd.weighting import DynamicWeightAverage, TeacherAnnealing, UncertaintyWeighting


def teacher_net():
    torch.manual_seed(123)  # the same teacher weights in every process and every run
    return conv_net((8, 16), 32).eval()


def single_task_teacher(task):
    torch.manual_seed({"left": 11, "right": 12}[task])  # deterministic, and unlike the multi-task teacher
    return MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16), {task: 10}).eval()


def single_task_net(task):
    return MultiTaskNet(ConvBackbone(widths=(2, 4), hidden=8), {task: 10})


#: Epoch-stepped: its state (last_epoch, the decayed lr) must survive a resume.
STEP_LR = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)


def make_scratch(**options):
    return MultiTaskModule(conv_net((4, 8), 16), TASKS, **options)


def make_shared(**options):
    return SharedDistiller(conv_net((4, 8), 16), teacher_net(), TASKS, adaptor_lr=3e-3, **options)


def make_task_specific(**options):
    """Single-task teachers, an adaptor per task, learned uncertainty weights."""
    teachers = {task.name: single_task_teacher(task.name) for task in TASKS}
    return TaskSpecificDistiller(
        conv_net((4, 8), 16), teachers, TASKS, adaptor_lr=3e-3, weighting=UncertaintyWeighting(), **options
    )


def make_transfer(**options):
    """One student per task, DWA weights (loss history and running sums)."""
    students = {task.name: single_task_net(task.name) for task in TASKS}
    return TransferDistiller(students, teacher_net(), TASKS, weighting=DynamicWeightAverage(), **options)


def make_adaptive(**options):
    """Gap-driven KD weights and temperatures, and an epoch-stepped LR schedule."""
    return AdaptiveDistiller(
        conv_net((4, 8), 16), teacher_net(), TASKS, adaptive_temperature=True, scheduler=STEP_LR, **options
    )


def make_attention(**options):
    """Attention transfer with teacher annealing (progress in steps)."""
    layers = [AttentionPair("backbone.features.3", "backbone.features.3")]
    return AttentionDistiller(
        conv_net((4, 8), 16), teacher_net(), TASKS, layers, weighting=TeacherAnnealing(), **options
    )


def make_fusion(**options):
    """A multi-task and a single-task teacher, fused by learned gates."""
    teachers = {"multitask": teacher_net(), "left": single_task_teacher("left")}
    return FusionDistiller(conv_net((4, 8), 16), teachers, TASKS, fusion="learned", adaptor_lr=3e-3, **options)


def make_crd(**options):
    """Contrastive representation distillation: projection heads and memory banks keyed by batch['index']."""
    return SharedDistiller(conv_net((4, 8), 16), teacher_net(), TASKS, distance="crd", kd_loss="dkd", **options)


def make_mutual(**options):
    """Deep mutual learning: a student and a single-task peer, both trained."""
    return MutualDistiller(conv_net((4, 8), 16), {"left": single_task_net("left")}, TASKS, **options)


def make_self(**options):
    """An EMA teacher of the student itself (saved in the checkpoint), with a hint to its feature (an adaptor).

    (A batch-relational distance, cka or rkd, would differ under DDP by design: each rank relates its own samples.)
    """
    return SelfDistiller(conv_net((4, 8), 16), TASKS, ema_decay=0.9, hint_weight=0.5, **options)


#: Factories at module scope, so ddp_spawn can pickle them.
STRATEGIES = {
    "scratch": make_scratch,
    "shared": make_shared,
    "task_specific": make_task_specific,
    "transfer": make_transfer,
    "adaptive": make_adaptive,
    "attention": make_attention,
    "fusion": make_fusion,
    "crd": make_crd,
    "mutual": make_mutual,
    "self": make_self,
}
#: Teachers that learn while the student does: their outputs cannot be cached.
ONLINE = ("mutual", "self")
DISTILLERS = [name for name in STRATEGIES if name != "scratch"]


class Crash(Exception):
    """The interruption: the process dies as the given epoch starts."""


class EpochsRun(Callback):
    """Records the epochs a run trains: a resumed run must start where the checkpoint left off."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, module):
        self.epochs.append(trainer.current_epoch)


class CrashAtEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            raise Crash(f"interrupted at the start of epoch {self.epoch}")


def _fit(factory, tmp_path, epochs, ckpt_path=None, callbacks=(), **kwargs):
    L.seed_everything(7)
    module = factory()
    # save_top_k=1 without a monitor: the latest epoch is written after every epoch (and `last` with it).
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=1)
    trainer = quick_trainer(
        tmp_path,
        max_epochs=epochs,
        deterministic=True,
        enable_checkpointing=True,
        callbacks=[checkpoint, *callbacks],
        **kwargs,
    )
    trainer.fit(module, random_datamodule(n=64, batch_size=16, seed=3), ckpt_path=ckpt_path)
    return module, trainer


def assert_same_state(a, b, where):
    """Tensors, and the dicts / lists of tensors of extra state, equal exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def plain_tensor_attributes(module):
    """Tensors a module keeps as plain attributes, outside parameters and buffers (and so outside
    ``state_dict`` unless the module saves them itself), in it and every submodule."""
    return {
        f"{name}.{attr}" if name else attr: value
        for name, sub in module.named_modules()
        for attr, value in vars(sub).items()
        if isinstance(value, torch.Tensor)
    }


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resume_from_last_checkpoint_is_exact(name, tmp_path):
    """Crash after two of three epochs, resume from ``last``: everything ends as in an uninterrupted run."""
    factory = STRATEGIES[name]
    straight, straight_trainer = _fit(factory, tmp_path / "straight", epochs=3)
    with pytest.raises(Crash):
        _fit(factory, tmp_path / "interrupted", epochs=3, callbacks=[CrashAtEpoch(2)])
    epochs = EpochsRun()
    resumed, resumed_trainer = _fit(factory, tmp_path / "interrupted", epochs=3, ckpt_path="last", callbacks=[epochs])
    assert epochs.epochs == [2], "the run did not resume from the checkpoint of epoch 2"

    # Student, adaptors, gates, weighting (parameters, buffers and extra state such as DWA's running sums).
    assert_same_state(straight.state_dict(), resumed.state_dict(), "state_dict")
    # State kept outside state_dict (a weighting's running sums, cached temperatures) must match too.
    assert_same_state(plain_tensor_attributes(straight), plain_tensor_attributes(resumed), "attributes")
    assert_same_state(straight.weighting.current_weights(), resumed.weighting.current_weights(), "weights")
    opt_a = straight_trainer.optimizers[0].state_dict()
    opt_b = resumed_trainer.optimizers[0].state_dict()
    assert_same_state(opt_a, opt_b, "optimizer")
    schedulers = [
        (a.scheduler.state_dict(), b.scheduler.state_dict())
        for a, b in zip(straight_trainer.lr_scheduler_configs, resumed_trainer.lr_scheduler_configs, strict=True)
    ]
    for sched_a, sched_b in schedulers:
        assert_same_state(sched_a, sched_b, "scheduler")
    if name == "adaptive":
        assert straight_trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
    # Every logged metric (losses, task metrics, weights, KD weights, fusion weights) equals.
    assert straight_trainer.callback_metrics.keys() == resumed_trainer.callback_metrics.keys()
    for key, value in straight_trainer.callback_metrics.items():
        assert torch.equal(value, resumed_trainer.callback_metrics[key]), key


def _validate(module, tmp_path):
    single = quick_trainer(tmp_path, devices=1)
    single.validate(module, random_datamodule(n=64, batch_size=16, seed=3), verbose=False)
    return single.callback_metrics


@pytest.mark.ddp
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_ddp_two_cpu_processes_match_a_single_process_evaluation(name, tmp_path):
    """Two gloo processes: synced val metrics equal one process's evaluation of the same weights, the checkpoint
    reloads in one process (with its teachers) and evaluates alike, and a per-rank in-memory teacher cache
    changes no logged figure."""
    module, trainer = _fit(STRATEGIES[name], tmp_path, epochs=2, strategy="ddp_spawn", devices=2)
    synced = {k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    single = _validate(module, tmp_path)
    keys = ["val/left/acc", "val/right/acc", "val/left/loss", "val/right/loss"]
    # AdaptiveDistiller's KD weights and DWA's task weights (transfer) move after each validation epoch, so those
    # two val/loss figures are not a function of the final state alone; every other strategy's is.
    keys += [] if name in ("adaptive", "transfer") else ["val/loss"]
    for key in keys:
        torch.testing.assert_close(synced[key], single[key], msg=key)

    reloaded = type(module).load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True, **_teacher_kwargs(module))
    x = torch.randn(4, 1, 12, 12)
    module.eval(), reloaded.eval()
    for task in ("left", "right"):
        torch.testing.assert_close(reloaded(x)[task], module(x)[task])
    if name == "scratch":
        return
    if name in ONLINE:  # the peers or the EMA teacher are in the checkpoint: they evaluate alike too
        again = _validate(reloaded, tmp_path)
        torch.testing.assert_close(again["val/left/teacher_acc"], single["val/left/teacher_acc"])
        with pytest.raises(RuntimeError, match="cannot be cached: remove the TeacherCache"):
            _fit(STRATEGIES[name], tmp_path / "cached", epochs=1, callbacks=[TeacherCache(storage="memory")])
        return
    # With its teachers back, the reloaded student evaluates exactly as the trained one (fused targets included).
    again = _validate(reloaded, tmp_path)
    for key in ("val/left/acc", "val/loss", "val/left/teacher_acc", "val/right/teacher_acc"):
        torch.testing.assert_close(again[key], single[key], msg=key)

    # Each rank caches its own samples' teacher outputs in memory (filled in epoch 1, read in epoch 2).
    cache = TeacherCache(storage="memory")
    _, cached = _fit(
        STRATEGIES[name], tmp_path / "cached", epochs=2, strategy="ddp_spawn", devices=2, callbacks=[cache]
    )
    logged = [k for k in trainer.callback_metrics if k.startswith(("val/", "train/"))]
    assert "train/loss_epoch" in logged and "val/left/teacher_acc" in logged
    for key in logged:
        torch.testing.assert_close(cached.callback_metrics[key], trainer.callback_metrics[key], msg=key)


def _teacher_kwargs(module):
    """The teachers a strategy's checkpoint needs back (teachers given as modules are never saved)."""
    if not hasattr(module, "teachers") or "teacher" in getattr(type(module), "fixed_parameters", ()):
        return {}
    teachers = {
        name: teacher_net() if name in ("teacher", "multitask") else single_task_teacher(name)
        for name in module.teachers.names
    }
    return {"teacher": teachers["teacher"] if list(teachers) == ["teacher"] else teachers}


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
