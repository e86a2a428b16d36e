"""The teacher-output cache: same numbers as no cache, rebuilt on any change or damage, lean once filled."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from conftest import HEADS, TASKS, conv_net, quick_trainer, random_datamodule
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_mtkd import DistillationModule, FeaturePair, MultiTaskModule, SharedDistiller
from lightning_mtkd.callbacks import TeacherCache
from lightning_mtkd.callbacks.teacher_cache import HEADER_BYTES, _read_header, _write_header, read_cache_file
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.models import ConvBackbone, FeatureTap, MultiTaskNet


class ForwardCounter:
    """Counts a teacher's forward passes and the samples they saw (a real forward hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = self.samples = 0
        model.register_forward_hook(self)

    def __call__(self, _module, inputs, _output) -> None:
        self.calls += 1
        self.samples += inputs[0].shape[0]


def student_net() -> nn.Module:
    # Dropout draws from the global RNG each step: a cache that consumed random numbers would change the student.
    return MultiTaskNet(ConvBackbone(widths=(2, 4), hidden=8, dropout=0.5), HEADS)


def fit(tmp_path, teacher, cache=None, epochs=2, dm=None, module_cls=SharedDistiller, **kwargs):
    L.seed_everything(0)
    module = module_cls(student_net(), teacher, TASKS, **kwargs)
    trainer = quick_trainer(tmp_path, max_epochs=epochs, callbacks=[cache] if cache else [])
    trainer.fit(module, dm or random_datamodule())
    return module, trainer


def assert_same_student(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if not isinstance(p, torch.Tensor):  # extra state: which class each dry-run-sized module is
            assert p == q, name
            continue
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def teacher_net(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return conv_net((8, 16), 32)


def cache_files(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".bin")) if os.path.isdir(directory) else []


@pytest.mark.parametrize(
    "options",
    [{"storage": "memory"}, {"storage": "disk"}, {"storage": "disk", "precompute": True}],
    ids=["memory", "disk", "disk-precompute"],
)
def test_cached_run_gives_the_same_losses_and_student_as_uncached(tmp_path, options):
    reference, ref_trainer = fit(tmp_path, teacher_net())
    teacher = teacher_net()
    counter = ForwardCounter(teacher)
    cache = TeacherCache(cache_dir=str(tmp_path / "cache"), **options)
    cached, trainer = fit(tmp_path, teacher, cache)

    assert_same_student(reference.model, cached.model)
    assert_same_student(reference.adaptors, cached.adaptors)
    for key in ("train/loss_epoch", "train/hint", "val/loss", "val/left/kd", "val/left/teacher_acc"):
        torch.testing.assert_close(trainer.callback_metrics[key], ref_trainer.callback_metrics[key], rtol=0, atol=1e-6)
    # 64 train + 32 val samples in batches of 16, 2 epochs: the teacher saw each sample once (plus small probes).
    batches = cache.counts["train"]
    assert batches["cached"] + batches["computed"] == 2 * 4
    assert batches["computed"] == (0 if options.get("precompute") else 4)
    assert counter.samples <= 64 + 32 + 8, counter.samples  # uncached: 2 × 96 + sanity check


def test_disk_cache_is_shared_by_runs_and_rebuilt_when_teacher_or_data_change(tmp_path):
    directory = tmp_path / "cache"
    fit(tmp_path, teacher_net(), TeacherCache(storage="disk", cache_dir=str(directory)), epochs=1)
    files = cache_files(directory)
    assert len(files) == 2 and all(_read_header(str(directory / f))["complete"] for f in files)

    again = TeacherCache(storage="disk", cache_dir=str(directory))
    fit(tmp_path, teacher_net(), again, epochs=1)
    assert again.counts["train"] == {"cached": 4, "computed": 0} and cache_files(directory) == files

    changed_teacher = teacher_net()
    with torch.no_grad():
        changed_teacher.heads["left"].bias[0] += 1e-3  # one weight of one head
    rebuilt = TeacherCache(storage="disk", cache_dir=str(directory))
    fit(tmp_path, changed_teacher, rebuilt, epochs=1)
    assert rebuilt.counts["train"]["computed"] == 4 and len(cache_files(directory)) == 4

    other_data = TeacherCache(storage="disk", cache_dir=str(directory))
    fit(tmp_path, teacher_net(), other_data, epochs=1, dm=random_datamodule(seed=1))
    assert other_data.counts["train"]["computed"] == 4 and len(cache_files(directory)) == 6


@pytest.mark.parametrize(
    ("damage", "message"),
    [("flip", "checksum mismatch"), ("truncate", "truncated"), ("header", "bad magic"), ("incomplete", "incomplete")],
)
def test_damaged_cache_file_is_detected_and_rebuilt(tmp_path, damage, message):
    directory = tmp_path / "cache"
    reference, _ = fit(tmp_path, teacher_net(), epochs=2)
    fit(tmp_path, teacher_net(), TeacherCache(storage="disk", cache_dir=str(directory), splits=["train"]), epochs=1)
    (name,) = cache_files(directory)
    path = directory / name
    data = bytearray(path.read_bytes())
    if damage == "flip":  # one byte of the first stored logit row: numbers that would still parse
        data[HEADER_BYTES + 1] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "header":
        data[:8] = b"garbage!"
    else:  # a run that was killed before the file was complete
        _write_header(str(path), {**_read_header(str(path)), "complete": False})
        data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data))

    cache = TeacherCache(storage="disk", cache_dir=str(directory), splits=["train"])
    with pytest.warns(UserWarning, match=message):
        rebuilt, _ = fit(tmp_path, teacher_net(), cache, epochs=2)
    assert cache.counts["train"] == {"cached": 4, "computed": 4}  # refilled in epoch 1, reused in epoch 2
    assert_same_student(reference.model, rebuilt.model)
    assert _read_header(str(path))["complete"]


class NoisyDataset(MultiTaskDataset):
    """A random augmentation: Gaussian noise drawn anew at every read."""

    def gather(self, indices):
        batch = super().gather(indices)
        return {**batch, "input": batch["input"] + 0.1 * torch.randn_like(batch["input"])}


def noisy_datamodule() -> MultiTaskDataModule:
    clean = random_datamodule()
    clean.setup()
    train = clean.splits["train"]
    return MultiTaskDataModule(NoisyDataset(train.inputs, train.targets), clean.splits["val"], batch_size=16)


def test_random_transform_is_refused_with_a_clear_error_unless_allowed(tmp_path):
    with pytest.raises(RuntimeError, match="random transform.*allow_random_transforms=True"):
        fit(tmp_path, teacher_net(), TeacherCache(), epochs=1, dm=noisy_datamodule())
    allowed = TeacherCache(allow_random_transforms=True)
    fit(tmp_path, teacher_net(), allowed, epochs=2, dm=noisy_datamodule())
    assert allowed.counts["train"] == {"cached": 4, "computed": 4}


class TwoTeacherFeatureDistiller(DistillationModule):
    """Two single-task teachers; soft targets plus a distance to each teacher's tapped trunk feature."""

    def feature_pairs(self):
        return [FeaturePair(f"feat/{name}", "backbone", "backbone", teacher=name, adapt=False) for name in self.tasks]

    def distillation_loss(self, step):
        terms = self.soft_target_terms(step)
        self.seen_feature_dtypes = {out.features["backbone"].dtype for out in step.teachers.values()}
        for name, out in step.teachers.items():
            terms[f"feat/{name}"] = out.features["backbone"].float().pow(2).mean() * 0 + out.outputs[name].mean() * 0
        return terms


def test_multi_teacher_outputs_and_features_are_cached_per_teacher(tmp_path):
    def teachers():
        torch.manual_seed(3)
        return {"left": conv_net((8, 16), 32), "right": conv_net((4, 8), 24)}

    reference, _ = fit(tmp_path, teachers(), module_cls=TwoTeacherFeatureDistiller)
    cache = TeacherCache(storage="disk", cache_dir=str(tmp_path / "c"), feature_dtype="float16")
    cached, _ = fit(tmp_path, teachers(), cache, module_cls=TwoTeacherFeatureDistiller)
    assert_same_student(reference.model, cached.model)  # features enter the loss with weight 0; logits exactly

    store = cache_files(tmp_path / "c")
    header = _read_header(str(tmp_path / "c" / next(f for f in store if f.startswith("train"))))
    arrays = header["layout"]["arrays"]
    assert arrays["left/features/backbone"] == {**arrays["left/features/backbone"], "shape": [32], "dtype": "float16"}
    assert arrays["right/features/backbone"]["shape"] == [24] and arrays["right/outputs/right"]["dtype"] == "float32"

    # The file holds each teacher's own outputs for every sample in index order (features to fp16 precision),
    # and the strategy was handed them back as fp32.
    assert cached.seen_feature_dtypes == {torch.float32}
    rows = read_cache_file(str(tmp_path / "c" / next(f for f in store if f.startswith("train"))))
    dm = random_datamodule()
    dm.setup()
    computed = cached.run_teachers(dm.splits["train"].gather(list(range(64))))
    for name in ("left", "right"):
        torch.testing.assert_close(rows[f"{name}/outputs/{name}"], computed[name].outputs[name], rtol=0, atol=1e-6)
        features = rows[f"{name}/features/backbone"]
        assert features.dtype == torch.float16
        torch.testing.assert_close(features.float(), computed[name].features["backbone"], rtol=1e-3, atol=1e-3)


class SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for a GPU: ``aten._local_scalar_dense`` (``.item()``, ``bool(tensor)``),
    ``nonzero`` and boolean-mask indexing (results whose size depends on the data)."""

    SYNC_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
    INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default)

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func in self.INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        if func in self.SYNC_OPS or masked:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_hot_path_has_no_host_sync(tmp_path, cached):
    """After the first epoch (which checks the first batch and fills the cache), a step — teacher outputs, losses,
    the student's and the teacher's metrics, the logged terms — never syncs with the host, in training or validation."""
    counters = {(epoch, stage): SyncCounter() for epoch in range(2) for stage in ("train", "val")}
    steps: list[tuple[int, int]] = []

    class Watched(SharedDistiller):
        def training_step(self, batch, batch_idx):
            steps.append((self.current_epoch, batch_idx))
            with counters[(self.current_epoch, "train")]:
                return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            if self.trainer.sanity_checking:
                return super().validation_step(batch, batch_idx)
            with counters[(self.current_epoch, "val")]:
                return super().validation_step(batch, batch_idx)

    cache = TeacherCache(storage="memory") if cached else None
    fit(tmp_path, teacher_net(), cache, epochs=2, module_cls=Watched)
    assert len(steps) == 8 and (cache is None or cache.counts["train"] == {"cached": 4, "computed": 4})
    assert counters[(0, "train")].syncs > 0  # epoch 0 fills the cache and checks the first batch: the counter sees it
    assert counters[(1, "train")].syncs == 0
    assert counters[(1, "val")].syncs == 0


def test_missing_or_out_of_range_index_and_wrong_module_get_clear_errors(tmp_path):
    class NoIndex(MultiTaskDataset):
        def gather(self, indices):
            batch = super().gather(indices)
            del batch["index"]
            return batch

    clean = random_datamodule()
    clean.setup()
    train = clean.splits["train"]
    with pytest.raises(KeyError, match="batch\\['index'\\]"):
        fit(tmp_path, teacher_net(), TeacherCache(), epochs=1,
            dm=MultiTaskDataModule(NoIndex(train.inputs, train.targets), clean.splits["val"], batch_size=16))

    class Shifted(MultiTaskDataset):
        def gather(self, indices):
            batch = super().gather(indices)
            return {**batch, "index": batch["index"] + 1000}

    with pytest.raises(IndexError, match="has 64 samples"):
        fit(tmp_path, teacher_net(), TeacherCache(), epochs=1,
            dm=MultiTaskDataModule(Shifted(train.inputs, train.targets), clean.splits["val"], batch_size=16))

    with pytest.raises(TypeError, match="TeacherCache caches the outputs of a distillation module"):
        quick_trainer(tmp_path, max_steps=1, callbacks=[TeacherCache()]).fit(MultiTaskModule(conv_net(), TASKS), clean)


@pytest.mark.ddp
def test_cache_under_two_process_cpu_ddp(tmp_path):
    """Each rank reads and writes its sampler's samples: a shared file on disk, or a per-rank copy in memory."""

    def fit_ddp(cache):
        L.seed_everything(0)
        module = SharedDistiller(conv_net((2, 4), 8), teacher_net(), TASKS)
        trainer = quick_trainer(tmp_path, max_epochs=2, strategy="ddp_spawn", devices=2, limit_val_batches=0,
                                callbacks=[cache] if cache else [])
        trainer.fit(module, random_datamodule())
        return module

    reference = fit_ddp(None)
    directory = tmp_path / "cache"
    on_disk = fit_ddp(TeacherCache(storage="disk", cache_dir=str(directory)))
    in_memory = fit_ddp(TeacherCache(storage="memory"))
    precomputed = fit_ddp(TeacherCache(storage="disk", cache_dir=str(tmp_path / "pre"), precompute=True))
    assert_same_student(reference.model, on_disk.model)
    assert_same_student(reference.model, in_memory.model)
    assert_same_student(reference.model, precomputed.model)
    assert cache_files(tmp_path / "pre") == cache_files(directory)  # same fingerprint, filled by rank shards

    # The two ranks filled disjoint halves of one file; together they hold every sample's teacher outputs.
    (name,) = cache_files(directory)
    rows = read_cache_file(str(directory / name))
    precomputed_rows = read_cache_file(str(tmp_path / "pre" / name))
    assert precomputed_rows.keys() == rows.keys()
    for key, value in precomputed_rows.items():  # float rounding only: NHWC conv kernels depend on the batch size
        torch.testing.assert_close(rows[key], value, rtol=0, atol=1e-6)
    dm = random_datamodule()
    dm.setup()
    teacher = teacher_net().eval()
    tap = FeatureTap(teacher, ["backbone"])
    with torch.no_grad():
        outputs = teacher(dm.splits["train"].inputs)
    torch.testing.assert_close(rows["teacher/outputs/left"], outputs["left"], rtol=0, atol=1e-6)
    torch.testing.assert_close(rows["teacher/features/backbone"], tap.pop()["backbone"], rtol=0, atol=1e-6)


def test_cache_is_added_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's ModelCheckpoint writes under ./checkpoints
    from pathlib import Path

    from lightning_mtkd.cli import main

    teacher = MultiTaskModule(conv_net((8, 16), 32), TASKS)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(teacher, random_datamodule(shape=(1, 36, 36)))
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    config = Path(__file__).parents[1] / "configs" / "multimnist" / "shared.yaml"
    cli = main(
        ["fit", "--config", str(config), f"--model.init_args.teacher={path}", "--trainer.max_epochs=2",
         "--trainer.limit_val_batches=1", "--trainer.logger=false",
         f"--trainer.default_root_dir={tmp_path}",
         "--trainer.callbacks+=lightning_mtkd.callbacks.TeacherCache", "--trainer.callbacks.storage=memory",
         "--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.batch_size=16"]
    )
    (cache,) = [c for c in cli.trainer.callbacks if isinstance(c, TeacherCache)]
    assert cache.storage == "memory"
    assert cache.counts["train"] == {"cached": 4, "computed": 4}  # 64 samples, batches of 16: epoch 2 reuses epoch 1
