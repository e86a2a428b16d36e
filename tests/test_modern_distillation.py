"""The modern losses inside the shared step (per-task kd_loss; cka, rkd, crd hints) and online distillation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import HEADS, TASKS, conv_net, hook_step, mlp_net, quick_trainer, random_datamodule
from test_cli_configs import SMALL_DATA
from torch.utils.data import DataLoader, Sampler

from lightning_mtkd import (
    ModelOutputs,
    MultiTaskModule,
    MutualDistiller,
    SelfDistiller,
    SharedDistiller,
    Task,
    TaskSpecificDistiller,
    TransferDistiller,
)
from lightning_mtkd.cli import main
from lightning_mtkd.losses import dist_loss, dkd_loss, feature_distance, kl_loss, rkd_loss, soft_target_kd
from lightning_mtkd.models import ConvBackbone, MultiTaskNet
from lightning_mtkd.models.adaptors import CRDHead
from lightning_mtkd.strategies import CRD

CONFIGS = Path(__file__).parents[1] / "configs" / "multimnist"


def single_task_net(task: str) -> MultiTaskNet:
    return MultiTaskNet(ConvBackbone(widths=(2, 4), hidden=8), {task: 10})


# ---------------------------------------------------------------------------------- kd_loss, per task
def test_each_task_distils_with_its_own_kd_loss_as_the_pure_functions_compute_it():
    module = SharedDistiller(conv_net(), conv_net((8, 16), 32), TASKS, temperature=2.0,
                             kd_loss={"left": "dkd", "right": "dist"}, hint_weight=0)
    torch.manual_seed(0)
    student = ModelOutputs({t: torch.randn(6, 10) for t in HEADS})
    teacher = ModelOutputs({t: torch.randn(6, 10) for t in HEADS})
    labels = {"left": torch.tensor([1, 2, 3, 4, -100, 5]), "right": torch.randint(0, 10, (6,))}
    terms = module.distillation_loss(hook_step(module, student, {"teacher": teacher}, {"targets": labels}))
    torch.testing.assert_close(terms["kd/left"], dkd_loss(student.outputs["left"], teacher.outputs["left"],
                                                           labels["left"], temperature=2.0))
    torch.testing.assert_close(terms["kd/right"], dist_loss(student.outputs["right"], teacher.outputs["right"],
                                                            temperature=2.0))
    standardised = SharedDistiller(conv_net(), conv_net(), TASKS, temperature=2.0, kd_loss="ls", hint_weight=0)
    terms = standardised.distillation_loss(hook_step(standardised, student, {"teacher": teacher}, {"targets": labels}))
    torch.testing.assert_close(terms["kd/left"], kl_loss(student.outputs["left"], teacher.outputs["left"], 2.0,
                                                          standardize=True))
    assert not torch.allclose(terms["kd/left"], soft_target_kd(student.outputs["left"], teacher.outputs["left"], 2.0))


@pytest.mark.parametrize("kd_loss", ["kl", "ls", "dkd", "dkd+ls", "dist", "mse"])
def test_every_kd_loss_fits_in_every_strategy_that_distils_logits(kd_loss, tmp_path):
    L.seed_everything(0)
    teacher = conv_net((8, 16), 32)
    for module in (
        SharedDistiller(conv_net(), teacher, TASKS, kd_loss=kd_loss),
        TaskSpecificDistiller(conv_net(), {"left": teacher, "right": teacher}, TASKS, kd_loss=kd_loss),
        TransferDistiller({t.name: single_task_net(t.name) for t in TASKS}, teacher, TASKS, kd_loss=kd_loss),
    ):
        trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=1)
        trainer.fit(module, random_datamodule())
        assert torch.isfinite(trainer.callback_metrics["train/left/kd"])


def test_kd_losses_that_do_not_fit_a_task_kind_are_refused_naming_the_task():
    tasks = [Task("tags", kind="multilabel", num_classes=5), Task("age", kind="regression", num_classes=1)]
    net = MultiTaskNet(ConvBackbone(widths=(2, 4), hidden=8), {"tags": 5, "age": 1})
    with pytest.raises(ValueError, match=r"Task 'tags' \(multilabel\): kd_loss 'dkd' does not apply.*\['kl', 'mse'\]"):
        SharedDistiller(net, net, tasks, kd_loss={"tags": "dkd"})
    with pytest.raises(ValueError, match=r"Task 'age' \(regression\): kd_loss 'kl'.*\['mse'\]"):
        SharedDistiller(net, net, tasks, kd_loss="kl")
    with pytest.raises(ValueError, match=r"kd_loss names unknown task\(s\) \['colour'\]"):
        SharedDistiller(net, net, tasks, kd_loss={"colour": "mse"})
    SharedDistiller(net, net, tasks, kd_loss={"tags": "mse", "age": "mse"})  # both apply


# ---------------------------------------------------------------------------------- feature distances
@pytest.mark.parametrize("distance", ["cka", "rkd"])
def test_direct_feature_distances_need_no_adaptor_and_equal_the_pure_functions(distance, tmp_path):
    teacher = conv_net((8, 16), 32)
    module = SharedDistiller(conv_net(), teacher, TASKS, distance=distance, hint_weight=2.0)
    trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(module, random_datamodule())
    assert len(module.adaptors) == 0  # widths 8 and 32 compared as they are
    batch = random_datamodule().train_dataloader().dataset.dataset.gather(list(range(8)))
    step = module.forward_step(batch, "val")
    s, t = step.student.features["backbone"], step.teachers["teacher"].features["backbone"]
    expected = rkd_loss(s, t) if distance == "rkd" else feature_distance(s, t, "cka")
    torch.testing.assert_close(module.hint_terms(step)["hint"], 2.0 * expected)


class SeenIndices(L.Callback):
    """The memory banks as they start, and the dataset indices of the training batches."""

    def __init__(self):
        self.start, self.seen = None, []

    def on_train_start(self, trainer, module):
        self.start = module.adaptors["hint"].memory.student_memory.clone()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(batch["index"])


def test_crd_trains_projection_heads_and_memory_banks_keyed_by_index_and_reloads(tmp_path):
    L.seed_everything(0)
    module = SharedDistiller(conv_net(), conv_net((8, 16), 32), TASKS, distance="crd")
    record = SeenIndices()
    trainer = quick_trainer(tmp_path, max_steps=3, limit_val_batches=1, callbacks=[record])
    trainer.fit(module, random_datamodule(n=64))
    head = module.adaptors["hint"]
    assert isinstance(head, CRDHead) and head.memory.student_memory.shape == (64, 128)  # one row per training sample
    assert head.negatives == 63  # at most every other sample
    assert "train/hint" in trainer.callback_metrics and "val/hint" not in trainer.callback_metrics  # training only
    # The rows of the samples seen moved; the others kept their random start.
    seen = torch.zeros(64, dtype=torch.bool)
    seen[torch.cat(record.seen)] = True
    moved = (head.memory.student_memory != record.start).any(dim=1)
    assert torch.equal(moved, seen) and 0 < int(seen.sum()) < 64

    path = tmp_path / "crd.ckpt"
    trainer.save_checkpoint(path)
    assert "adaptors.hint.memory.student_memory" in torch.load(path, weights_only=True)["state_dict"]
    reloaded = SharedDistiller.load_from_checkpoint(path, weights_only=True, teacher=module.teacher)
    torch.testing.assert_close(reloaded.adaptors["hint"].memory.teacher_memory, head.memory.teacher_memory)


def crd_module():
    """MLPs: no batch norm, whose per-rank batch statistics would differ from one process's by design."""
    torch.manual_seed(5)
    teacher = mlp_net(12, (32,))
    torch.manual_seed(6)
    return SharedDistiller(mlp_net(12, (8,)), teacher, TASKS, distance="crd", adaptor_lr=1e-2)


class EveryOther(Sampler):
    """Rank r of w reads samples r, r + w, r + 2w, … in order: the ranks' k-th batches together are one process's.

    (Lightning's own DistributedSampler shuffles training data, so its global batches differ from one process's.)
    """

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length // self._world()[1]

    def __iter__(self):
        rank, world = self._world()
        return iter(range(rank, self.length, world))

    @staticmethod
    def _world() -> tuple[int, int]:
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ready else (0, 1)


@pytest.mark.ddp
def test_crd_under_two_ddp_processes_equals_one_process(tmp_path):
    """Each rank updates its own samples' rows and gathers the others': the banks and the student after an
    epoch equal a single process's with the same global batches."""
    runs = {}
    for devices, batch_size in ((1, 16), (2, 8)):
        L.seed_everything(3)
        module = crd_module()
        options = {"strategy": "ddp_spawn", "devices": 2} if devices == 2 else {}
        trainer = quick_trainer(tmp_path / str(devices), max_epochs=1, limit_val_batches=0, deterministic=True,
                                use_distributed_sampler=False, **options)
        data = random_datamodule(n=64, shape=(12,), seed=3)
        data.setup()
        trainer.fit(module, DataLoader(data.splits["train"], batch_size=batch_size, sampler=EveryOther(64)))
        runs[devices] = module
    one, two = runs[1], runs[2]
    torch.testing.assert_close(two.adaptors["hint"].memory.student_memory, one.adaptors["hint"].memory.student_memory,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two.adaptors["hint"].memory.teacher_memory, one.adaptors["hint"].memory.teacher_memory,
                               rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(two.model.named_parameters(), one.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_crd_needs_the_sample_index():
    module = SharedDistiller(conv_net(), conv_net((8, 16), 32), TASKS, distance="crd")
    module.adaptors["hint"] = CRDHead(8, 32, 16)
    module._pairs = [replace(p, student="backbone", teacher_path="backbone") for p in module.feature_pairs()]
    from lightning_mtkd.models import FeatureTap

    module._student_tap = FeatureTap(module.model, ["backbone"])
    module.teachers.tap("teacher", ["backbone"])
    step = module.forward_step({"input": torch.randn(4, 1, 12, 12), "targets": {}})
    with pytest.raises(KeyError, match=r"crd feature distance keys its memory banks by batch\['index'\]"):
        module.hint_terms(step)


# ---------------------------------------------------------------------------------- online distillation
def test_mutual_learning_trains_student_and_peers_each_from_the_others_and_exports_a_peer(tmp_path):
    L.seed_everything(0)
    peers = {"left": single_task_net("left"), "both": conv_net((2, 4), 8)}
    module = MutualDistiller(conv_net(), peers, TASKS, alpha=0.5)
    before = {name: [p.detach().clone() for p in peer.parameters()] for name, peer in module.extras.items()}
    trainer = quick_trainer(tmp_path, max_epochs=1, limit_val_batches=1)
    trainer.fit(module, random_datamodule())
    for name, peer in module.extras.items():  # every peer learned
        assert any(not torch.equal(a, b) for a, b in zip(before[name], peer.parameters(), strict=True)), name
    groups = {g["name"]: {id(p) for p in g["params"]} for g in trainer.optimizers[0].param_groups}
    assert {id(p) for p in module.model.parameters()} <= groups["model"]
    assert {id(p) for p in module.extras.parameters()} <= groups["adaptors"]
    assert not groups["model"] & groups["adaptors"]
    metrics = trainer.callback_metrics
    assert {"train/peer_left", "train/peer_both", "train/left/kd", "val/left/teacher_acc"} <= set(metrics)

    # By hand: the student's kd/right is the mean over the peers that predict `right` (only `both`).
    batch = random_datamodule().train_dataloader().dataset.dataset.gather(list(range(8)))
    step = module.forward_step(batch)
    terms = module.distillation_loss(step)
    expected = soft_target_kd(step.student.outputs["right"], step.teachers["both"].outputs["right"], 4.0)
    torch.testing.assert_close(terms["kd/right"], expected)
    assert set(step.losses) == {"peer_left", "peer_both"}

    path = str(tmp_path / "mutual.ckpt")
    trainer.save_checkpoint(path)
    from lightning_mtkd.export import export_checkpoint

    names = export_checkpoint(path, str(tmp_path / "left.pt"), [1, 12, 12], "torchscript", student="extras.left")
    assert names == ["left"]
    x = torch.randn(3, 1, 12, 12)
    module.eval()
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "left.pt"))(x)["left"], module.extras["left"](x)["left"])


def test_the_ema_teacher_follows_the_student_after_each_optimizer_step_and_stays_out_of_the_optimizer(tmp_path):
    L.seed_everything(0)
    module = SelfDistiller(conv_net(), TASKS, ema_decay=0.75, kd_loss="dkd")
    initial = {k: v.clone() for k, v in module.ema.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(initial.values(), module.model.state_dict().values(), strict=True))
    trainer = quick_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, random_datamodule())
    for (name, ema), student in zip(module.ema.named_parameters(), module.model.parameters(), strict=True):
        torch.testing.assert_close(ema, 0.75 * initial[name] + 0.25 * student.detach(), msg=name)  # one step
        assert not ema.requires_grad
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in module.ema.parameters()}
    assert not module.ema.training
    path = tmp_path / "self.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SelfDistiller.load_from_checkpoint(path, weights_only=True)  # no teacher to pass: it is in the file
    for a, b in zip(reloaded.ema.parameters(), module.ema.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_online_strategies_refuse_bad_settings():
    with pytest.raises(ValueError, match=r"ema_decay must lie in \[0, 1\)"):
        SelfDistiller(conv_net(), TASKS, ema_decay=1.0)
    with pytest.raises(TypeError, match="MutualDistiller needs peers"):
        MutualDistiller(conv_net(), {}, TASKS)


# ---------------------------------------------------------------------------------- configs
NEW_CONFIGS = ["shared_dkd.yaml", "shared_dist.yaml", "shared_ls.yaml", "shared_cka.yaml", "shared_rkd.yaml",
               "shared_crd.yaml", "mutual.yaml", "self.yaml"]


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_new_option_configs_fit_one_step(name, tmp_path):
    config = CONFIGS / name
    extra = []
    if "teacher:" in config.read_text():  # a frozen teacher: a briefly trained one written here
        teacher = MultiTaskModule(conv_net((8, 16), 32), TASKS)
        trainer = quick_trainer(tmp_path, max_steps=1)
        trainer.fit(teacher, random_datamodule(shape=(1, 36, 36)))
        trainer.save_checkpoint(tmp_path / "teacher.ckpt")
        extra = [f"--model.init_args.teacher={tmp_path / 'teacher.ckpt'}"]
    main(["fit", "--config", str(config), "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.logger=false", *SMALL_DATA, *extra])


@pytest.mark.parametrize("option", [{"teacher_precision": "bf16"}, {"teacher_device": "cpu"}])
def test_the_ema_teacher_refuses_a_lower_precision_or_another_device_clearly(option):
    """The moving average is training state updated by small steps: kept in float32 beside the student, so the
    frozen-teacher options are refused by name instead of failing at the first optimizer step."""
    (name,) = option
    with pytest.raises(ValueError, match=f"SelfDistiller keeps its moving-average teacher in float32.*{name}="):
        SelfDistiller(conv_net(), TASKS, **option)


def test_crd_settings_reach_the_heads_and_survive_a_checkpoint(tmp_path):
    settings = CRD(dim=16, negatives=8, temperature=0.2, momentum=0.9)
    module = SharedDistiller(conv_net(), conv_net((8, 16), 32), TASKS, distance=settings)
    trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(module, random_datamodule(n=64))
    head = module.adaptors["hint"]
    assert head.memory.student_memory.shape == (64, 16) and head.negatives == 8
    assert head.temperature == pytest.approx(0.2) and head.memory.momentum == pytest.approx(0.9)
    assert "train/hint" in trainer.callback_metrics
    path = tmp_path / "crd.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SharedDistiller.load_from_checkpoint(path, weights_only=True, teacher=module.teacher)
    assert reloaded.distance == settings and reloaded.adaptors["hint"].negatives == 8
    with pytest.raises(ValueError, match="temperature"):
        CRD(temperature=0.0)


def test_an_unknown_distance_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown feature distance 'l3'.*'rkd', 'crd'.*CRD"):
        SharedDistiller(conv_net(), conv_net((8, 16), 32), TASKS, distance="l3")
