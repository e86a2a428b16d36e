"""Dense tasks (segmentation, depth, normals): losses and metrics by hand, SegNet, and NYUv2 from .npy files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quick_trainer

from lightning_mtkd import MultiTaskModule, SharedDistiller, Task
from lightning_mtkd.data import NYUv2DataModule
from lightning_mtkd.models import SegNet

NAN = math.nan


def compute(task: Task, output, target) -> dict[str, float]:
    metrics = task.make_metrics()
    for metric in metrics.values():
        metric.update(*task.metric_inputs(output, target))
    return {name: metric.compute().item() for name, metric in metrics.items()}


# ----------------------------------------------------------------------------------------------- by hand


def test_segmentation_loss_and_metrics_by_hand():
    task = Task("seg", kind="segmentation", num_classes=3)
    # one 2×3 image; predicted classes [[0, 1, 1], [2, 2, 0]], truth [[0, 1, 2], [2, -100, 1]]
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1).float()[None] * 2.0
    target = torch.tensor([[[0, 1, 2], [2, -100, 1]]])
    m = compute(task, logits, target)
    # valid pixels: 5, correct: (0,0) (0,1) (1,0) → 3/5
    assert m["pixel_acc"] == pytest.approx(3 / 5)
    # IoU: class 0: inter 1, union {(0,0),(1,2)} 2 → 1/2; class 1: inter 1, union {(0,1),(0,2),(1,2)} 3 → 1/3;
    # class 2: inter 1, union {(0,2),(1,0)} 2 → 1/2  (the ignored pixel, predicted 2, does not count)
    assert m["miou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    # loss: cross-entropy of logits (2 on the predicted class, 0 elsewhere) over the 5 valid pixels
    right, wrong = -math.log(math.e**2 / (math.e**2 + 2)), -math.log(1 / (math.e**2 + 2))
    assert task.supervised_loss(logits, target).item() == pytest.approx((3 * right + 2 * wrong) / 5, rel=1e-6)


def test_depth_loss_and_metrics_by_hand():
    task = Task("depth", kind="depth", num_classes=1)
    output = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    target = torch.tensor([[[[2.0, NAN], [3.0, 4.0]]]])
    m = compute(task, output, target)
    assert m["abs_err"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["rel_err"] == pytest.approx((1 / 2 + 0 + 1 / 4) / 3)
    assert task.supervised_loss(output, target).item() == pytest.approx(2 / 3)
    assert task.supervised_loss(output, target[:, 0]).item() == pytest.approx(2 / 3)  # (B, H, W) targets too


def test_normals_loss_and_metrics_by_hand():
    task = Task("normals", kind="normals", num_classes=3)
    # four pixels: exact (0°), 45°, 90°, and one without ground truth
    output = torch.tensor([[0.0, 0, 3], [1, 0, 1], [1, 0, 0], [0, 1, 0]]).T.reshape(1, 3, 2, 2)
    target = torch.tensor([[0.0, 0, 1], [0, 0, 1], [0, 0, 1], [NAN, NAN, NAN]]).T.reshape(1, 3, 2, 2)
    m = compute(task, output, target)
    assert m["mean_angle"] == pytest.approx((0 + 45 + 90) / 3, abs=1e-4)
    assert m["within_11_25"] == pytest.approx(1 / 3)
    expected = ((1 - 1) + (1 - math.cos(math.pi / 4)) + (1 - 0)) / 3
    assert task.supervised_loss(output, target).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind, channels", [("segmentation", 4), ("depth", 1), ("normals", 3)])
def test_dense_distillation_reaches_only_the_student_and_vanishes_at_the_teacher(kind, channels):
    task = Task("t", kind=kind, num_classes=channels)
    teacher = torch.randn(2, channels, 3, 5)
    student = torch.randn(2, channels, 3, 5, requires_grad=True)
    loss = task.distillation_loss(student, teacher, temperature=2.0)
    loss.backward()
    assert loss.item() > 0 and student.grad is not None and student.grad.abs().sum() > 0
    assert task.distillation_loss(teacher, teacher, temperature=2.0).item() == pytest.approx(0.0, abs=1e-5)
    if kind == "segmentation":  # per-pixel soft targets: the classification KD of every pixel, averaged
        flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, channels)  # noqa: E731
        reference = Task("c", num_classes=channels).distillation_loss(flat(student), flat(teacher), 2.0)
        torch.testing.assert_close(loss, reference)


def test_dense_target_errors():
    with pytest.raises(ValueError, match="a depth head outputs 1 channel"):
        Task("depth", kind="depth")
    seg = Task("seg", kind="segmentation", num_classes=3)
    with pytest.raises(TypeError, match="segmentation labels must be integers"):
        seg.check_target(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="same resolution"):
        seg.check_target(torch.zeros(2, 3, 4, 4), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pixel labels must lie in \[0, 2\]"):
        seg.check_target(torch.zeros(1, 3, 1, 2), torch.tensor([[[1, 3]]]))
    with pytest.raises(ValueError, match="must output maps"):
        seg.check_target(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert seg.missing_targets(2, (4, 5)).shape == (2, 4, 5)
    assert torch.isnan(Task("n", kind="normals", num_classes=3).missing_targets(2, (4, 5))).all()


# ----------------------------------------------------------------------------------------------- NYUv2 files

H, W = 6, 8


def write_nyuv2(root: Path, counts=(4, 2), seed: int = 0) -> dict:
    """The preprocessed layout of MTAN/LibMTL, with its conventions: -1 unlabelled, depth 0 and zero normals missing."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in zip(("train", "val"), counts, strict=True):
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = rng.random((H, W, 3)).astype(np.float32)
            label = rng.integers(-1, 13, (H, W)).astype(np.float32)
            depth = (rng.random((H, W, 1)) * 5).astype(np.float32)
            depth[0, 0] = 0.0
            normal = rng.normal(size=(H, W, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[1, 1] = 0.0
            for folder, array in (("image", image), ("label", label), ("depth", depth), ("normal", normal)):
                np.save(root / split / folder / f"{i}.npy", array)
            written[(split, i)] = (image, label, depth, normal)
    return written


def test_nyuv2_reads_the_published_layout(tmp_path):
    written = write_nyuv2(tmp_path)
    dm = NYUv2DataModule(str(tmp_path), batch_size=2)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 4, "val": 2, "test": 2}
    batch = dm.splits["val"].gather([1, 0])
    image, label, depth, normal = written[("val", 1)]
    torch.testing.assert_close(batch["input"][0], torch.from_numpy(image).permute(2, 0, 1))
    seg = batch["targets"]["segmentation"][0]
    assert seg.dtype == torch.long and (seg[torch.from_numpy(label == -1)] == -100).all()
    assert (seg[torch.from_numpy(label >= 0)] == torch.from_numpy(label[label >= 0]).long()).all()
    d = batch["targets"]["depth"][0]
    assert d.shape == (1, H, W) and math.isnan(d[0, 0, 0]) and d[0, 2, 3] == pytest.approx(float(depth[2, 3, 0]))
    n = batch["targets"]["normals"][0]
    assert n.shape == (3, H, W) and torch.isnan(n[:, 1, 1]).all()
    torch.testing.assert_close(n[:, 2, 2], torch.from_numpy(normal[2, 2]))
    assert [t.kind for t in dm.tasks()] == ["segmentation", "depth", "normals"]


def test_nyuv2_resize_subset_and_val_from_train(tmp_path):
    write_nyuv2(tmp_path)
    dm = NYUv2DataModule(str(tmp_path), tasks=["segmentation"], image_size=(3, 4), val_from_train=1, batch_size=2)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 3, "val": 1, "test": 2}
    assert not set(dm.splits["train"].indices) & set(dm.splits["val"].indices)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (2, 3, 3, 4) and list(batch["targets"]) == ["segmentation"]
    labels = batch["targets"]["segmentation"]
    assert labels.shape == (2, 3, 4) and set(labels.unique().tolist()) <= set(range(13)) | {-100}


def test_bad_nyuv2_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NYUv2DataModule(str(tmp_path / "none")).setup()
    write_nyuv2(tmp_path)
    (tmp_path / "train" / "depth" / "3.npy").unlink()
    with pytest.raises(ValueError, match=r"train/depth has 3 arrays but train/image has 4 \(no depth for indices \[3"):
        NYUv2DataModule(str(tmp_path)).setup()
    NYUv2DataModule(str(tmp_path), tasks=["segmentation", "normals"]).setup()  # depth not asked for: fine
    import shutil

    shutil.rmtree(tmp_path / "val" / "normal")
    with pytest.raises(FileNotFoundError, match="val/normal' does not exist"):
        NYUv2DataModule(str(tmp_path), tasks=["normals"]).setup()
    (tmp_path / "train" / "label" / "2.npy").write_bytes(b"\x93NUMPY garbage")
    dm = NYUv2DataModule(str(tmp_path), tasks=["segmentation"])
    dm.setup()
    with pytest.raises(ValueError, match="2.npy' cannot be read as a .npy array"):
        dm.splits["train"].gather([2])
    np.save(tmp_path / "train" / "label" / "2.npy", np.zeros((H, W + 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(6, 9\); a NYUv2 segmentation array is \(H, W\) with the image's"):
        dm.splits["train"].gather([2])


def test_segnet_fits_and_distils_on_nyuv2(tmp_path):
    write_nyuv2(tmp_path / "nyu")
    dm = NYUv2DataModule(str(tmp_path / "nyu"), batch_size=2)
    heads = {"segmentation": 13, "depth": 1, "normals": 3}
    torch.manual_seed(0)
    teacher = SegNet(heads, widths=(8, 16))
    trainer = quick_trainer(tmp_path, max_epochs=1)
    trainer.fit(MultiTaskModule(teacher, dm.tasks()), dm)
    assert {"val/segmentation/miou", "val/depth/abs_err", "val/normals/mean_angle"} <= set(trainer.callback_metrics)
    student = SegNet(heads, widths=(4, 8))
    module = SharedDistiller(student, teacher, dm.tasks(), student_feature="decoder", teacher_feature="decoder")
    trainer = quick_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    assert {"train/hint", "train/segmentation/kd", "train/normals/kd", "val/depth/teacher_abs_err"} <= set(metrics)
    assert module.adaptors["hint"].proj.weight.shape[:2] == (8, 4)  # a 1×1 conv between full-resolution maps


# ----------------------------------------------------------------------------------------------- configs

CONFIGS = Path(__file__).parents[1] / "configs" / "nyuv2"
NYU_SMALL = ["--data.init_args.image_size=[16, 16]", "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",
             "--trainer.accelerator=cpu"]


def cli_fit(config: str, tmp_path, *extra: str):
    from lightning_mtkd.cli import main

    args = ["fit", "--config", str(CONFIGS / config), "--trainer.fast_dev_run=1"]
    return main([*args, f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.root={tmp_path / 'nyu'}", *extra])


@pytest.mark.parametrize("name", ["teacher.yaml", "scratch.yaml"])
def test_nyuv2_training_configs_fit_one_step(name, tmp_path):
    write_nyuv2(tmp_path / "nyu")
    cli = cli_fit(name, tmp_path, *NYU_SMALL)
    assert "train/loss" in cli.trainer.callback_metrics


def test_nyuv2_shared_config_fits_one_step(tmp_path):
    write_nyuv2(tmp_path / "nyu")
    dm = NYUv2DataModule(str(tmp_path / "nyu"), image_size=(16, 16), batch_size=2)
    teacher = SegNet({"segmentation": 13, "depth": 1, "normals": 3}, widths=(8, 16))
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(MultiTaskModule(teacher, dm.tasks()), dm)
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    cli = cli_fit("shared.yaml", tmp_path, f"--model.init_args.teacher={tmp_path / 'teacher.ckpt'}", *NYU_SMALL)
    assert "train/hint" in cli.trainer.callback_metrics


def test_segnet_says_when_the_input_is_too_small():
    with pytest.raises(ValueError, match="inputs need sides of at least 8 pixels; got \\(4, 16\\)"):
        SegNet({"depth": 1}, widths=(2, 2, 2))(torch.zeros(1, 3, 4, 16))


def test_segnet_unpooling_matches_max_unpool_and_is_deterministic():
    import torch.nn.functional as F

    from lightning_mtkd.models.dense import _argmax_mask, _unpool

    was = torch.are_deterministic_algorithms_enabled()  # a CLI fit with deterministic: true leaves it on
    x = torch.randn(2, 3, 7, 9)  # odd sides: the last row and column are never pooled
    pooled, indices = F.max_pool2d(x, 2, return_indices=True)
    try:
        torch.use_deterministic_algorithms(False)
        reference = F.max_unpool2d(pooled, indices, 2, output_size=(7, 9))
        torch.testing.assert_close(_unpool(pooled, _argmax_mask(x, pooled)), reference)
        torch.use_deterministic_algorithms(True)  # max_unpool2d would raise here
        out = SegNet({"depth": 1}, widths=(2, 4))(torch.randn(1, 3, 9, 8))
        out["depth"].sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert out["depth"].shape == (1, 1, 9, 8)


def _strategy(name: str, tasks):
    from lightning_mtkd import (
        AdaptiveDistiller,
        AttentionDistiller,
        AttentionPair,
        FusionDistiller,
        TaskSpecificDistiller,
        TransferDistiller,
    )

    heads = {"segmentation": 13, "depth": 1, "normals": 3}
    student, teacher = SegNet(heads, widths=(4, 8)), SegNet(heads, widths=(8, 16))
    paths = {"student_feature": "decoder", "teacher_feature": "decoder"}
    if name == "shared":
        return SharedDistiller(student, teacher, tasks, **paths)
    if name == "task_specific":  # one single-task teacher per dense task
        teachers = {task: SegNet({task: size}, widths=(8, 16)) for task, size in heads.items()}
        return TaskSpecificDistiller(student, teachers, tasks, **paths)
    if name == "transfer":  # a small SegNet per task
        students = {task: SegNet({task: size}, widths=(4, 8)) for task, size in heads.items()}
        return TransferDistiller(students, teacher, tasks, **paths)
    if name == "adaptive":  # KD weights from the teacher-student gap of each task's primary metric
        return AdaptiveDistiller(student, teacher, tasks, adaptive_temperature=True)
    if name == "attention":  # attention maps of the full-resolution decoders, matched resolutions
        return AttentionDistiller(student, teacher, tasks, layers=[AttentionPair("decoder", "decoder")])
    return FusionDistiller(student, {"a": teacher, "b": SegNet(heads, widths=(4, 8))}, tasks, fusion="confidence")


@pytest.mark.parametrize("name", ["shared", "task_specific", "transfer", "fusion", "adaptive", "attention"])
def test_every_strategy_accepts_dense_tasks(name, tmp_path):
    write_nyuv2(tmp_path / "nyu")
    dm = NYUv2DataModule(str(tmp_path / "nyu"), image_size=(8, 8), batch_size=2)
    torch.manual_seed(0)
    module = _strategy(name, dm.tasks())
    trainer = quick_trainer(tmp_path, max_epochs=2, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, dm)  # two epochs: the adaptive weights are updated from the first epoch's gaps
    metrics = trainer.callback_metrics
    assert {"train/segmentation/kd", "train/depth/kd", "train/normals/kd"} <= set(metrics), sorted(metrics)
    assert all(torch.isfinite(v) for k, v in metrics.items() if k.startswith("train/")), metrics


def test_nyuv2_distils_with_mixed_inputs_and_refuses_a_shift_that_would_misalign_the_maps(tmp_path):
    from lightning_mtkd.data import BatchAugment

    write_nyuv2(tmp_path / "nyu")
    heads = {"segmentation": 13, "depth": 1, "normals": 3}
    torch.manual_seed(0)
    teacher, student = SegNet(heads, widths=(8, 16)), SegNet(heads, widths=(4, 8))
    mixed = NYUv2DataModule(str(tmp_path / "nyu"), batch_size=2, augment=BatchAugment(mixup=1.0, mixup_mode="append"))
    module = SharedDistiller(student, teacher, mixed.tasks(), hint_weight=0.0)
    trainer = quick_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, mixed)
    losses = [trainer.callback_metrics[f"train/{task}/kd"] for task in heads]
    assert all(torch.isfinite(loss) for loss in losses)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    shifted = NYUv2DataModule(str(tmp_path / "nyu"), batch_size=2, augment=BatchAugment(shift=2))
    with pytest.raises(ValueError, match=r"dense targets of \['segmentation', 'depth', 'normals'\].*shift=0"):
        quick_trainer(tmp_path, max_steps=1).fit(SharedDistiller(student, teacher, mixed.tasks()), shifted)
