"""One data set per task through CombinedLoader: two differently sized tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import quick_trainer

from lightning_mtkd import MultiTaskModule, SharedDistiller, Task
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset, PerTaskDataModule, merge_task_batches
from lightning_mtkd.models import MLPBackbone, MultiTaskNet

TASKS = [Task("digit", num_classes=3), Task("size", kind="regression", num_classes=1)]


def source(task: str, n: int, seed: int) -> MultiTaskDataModule:
    """A task's own data set: inputs (n, 6) and targets for that task only."""
    g = torch.Generator().manual_seed(seed)

    def split(size: int) -> MultiTaskDataset:
        x = torch.randn(size, 6, generator=g)
        y = torch.randint(0, 3, (size,), generator=g) if task == "digit" else torch.randn(size, 1, generator=g)
        return MultiTaskDataset(x, {task: y})

    return MultiTaskDataModule(split(n), split(n // 5), split(n // 5))


def two_sources(**kwargs) -> PerTaskDataModule:
    return PerTaskDataModule({"digit": source("digit", 100, 0), "size": source("size", 25, 1)}, **kwargs)


@pytest.mark.parametrize(("sampling", "tau", "expected"), [
    ("proportional", 0.5, {"digit": 16, "size": 4}),  # 100:25
    ("uniform", 0.5, {"digit": 10, "size": 10}),
    ("temperature", 0.5, {"digit": 13, "size": 7}),  # 10:5 → 2/3, 1/3 of 20
])
def test_batch_shares_follow_size_to_the_tau(sampling, tau, expected):
    dm = two_sources(batch_size=20, sampling=sampling, tau=tau)
    assert dm.batch_sizes() == expected
    loader = dm.train_dataloader()
    batch, _, _ = next(iter(loader))
    assert {name: len(b["input"]) for name, b in batch.items()} == expected
    # max_size_cycle: the epoch lasts as long as the longest source at its batch size
    assert len(loader) == max(-(-100 // expected["digit"]), -(-25 // expected["size"]))


def test_min_size_mode_ends_with_the_shortest_source():
    loader = two_sources(batch_size=20, sampling="uniform", mode="min_size").train_dataloader()
    iter(loader)
    assert len(loader) == 3  # min(ceil(100 / 10), ceil(25 / 10))


def test_merged_batch_is_the_per_task_view():
    dm = two_sources(batch_size=20, sampling="proportional")
    batch, _, _ = next(iter(dm.train_dataloader()))
    merged = merge_task_batches(batch, {t.name: t for t in TASKS})
    assert merged["input"].shape == (20, 6)
    digit, size = merged["targets"]["digit"], merged["targets"]["size"]
    assert digit.shape == (20,) and (digit[16:] == -100).all() and (digit[:16] >= 0).all()
    assert size.shape == (20, 1) and torch.isnan(size[:16]).all() and not torch.isnan(size[16:]).any()
    # indices are unique over the split: the size source's samples come after the digit source's 100
    assert (merged["index"][:16] < 100).all() and (merged["index"][16:] >= 100).all()
    size_inputs = dm.sources["size"].splits["train"].inputs
    torch.testing.assert_close(merged["input"][16:], size_inputs[merged["index"][16:] - 100])


def test_each_task_loss_is_over_its_own_data_set(tmp_path):
    """The shared step's loss on a merged batch equals the per-task losses computed on each source alone."""
    torch.manual_seed(0)
    net = MultiTaskNet(MLPBackbone(in_features=6, hidden=(8,)), heads={"digit": 3, "size": 1})
    module = MultiTaskModule(net, TASKS)
    dm = two_sources(batch_size=20, sampling="uniform")
    batch, _, _ = next(iter(dm.train_dataloader()))
    terms = module.shared_step(merge_task_batches(batch, module.tasks), "val")  # as the DataModule's hook does
    with torch.no_grad():
        expected_digit = F.cross_entropy(net(batch["digit"]["input"])["digit"], batch["digit"]["targets"]["digit"])
        expected_size = F.mse_loss(net(batch["size"]["input"])["size"], batch["size"]["targets"]["size"])
    torch.testing.assert_close(terms["digit/loss"].detach(), expected_digit)
    torch.testing.assert_close(terms["size/loss"].detach(), expected_size)


def test_fit_and_validate_over_two_sized_sources(tmp_path):
    torch.manual_seed(0)
    net = MultiTaskNet(MLPBackbone(in_features=6, hidden=(8,)), heads={"digit": 3, "size": 1})
    teacher = MultiTaskNet(MLPBackbone(in_features=6, hidden=(16,)), heads={"digit": 3, "size": 1})
    module = SharedDistiller(net, teacher, TASKS)  # adaptors sized from a CombinedLoader batch
    dm = two_sources(batch_size=10, sampling="temperature", tau=0.5)
    trainer = quick_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, dm)
    loader = dm.train_dataloader()
    iter(loader)
    assert dm.batch_sizes() == {"digit": 7, "size": 3}
    assert trainer.global_step == len(loader) == 15  # max(ceil(100 / 7), ceil(25 / 3)): the short source cycles
    metrics = trainer.callback_metrics
    assert {"val/digit/acc", "val/size/mae", "train/hint"} <= set(metrics)
    # validation reads each source's val split once (max_size): 20 digit and 5 size samples, the second step
    # has no size batch at all; the metrics equal those computed on each source alone
    results = trainer.validate(module, dm, verbose=False)[0]
    with torch.no_grad():
        digit, size = dm.sources["digit"].splits["val"], dm.sources["size"].splits["val"]
        acc = (net(digit.inputs)["digit"].argmax(1) == digit.targets["digit"]).float().mean()
        mae = (net(size.inputs)["size"] - size.targets["size"]).abs().mean()
    assert results["val/digit/acc"] == pytest.approx(acc.item(), abs=1e-6)
    assert results["val/size/mae"] == pytest.approx(mae.item(), abs=1e-6)


def test_errors(tmp_path):
    with pytest.raises(KeyError, match="source 'shape' has no target named 'shape'"):
        PerTaskDataModule({"digit": source("digit", 10, 0), "shape": source("size", 10, 1)}).setup()
    with pytest.raises(ValueError, match="tau must be"):
        two_sources(sampling="temperature", tau=-1.0)
    a = {"input": torch.zeros(2, 6), "targets": {"a": torch.zeros(2, dtype=torch.long)}, "index": torch.arange(2)}
    b = {"input": torch.zeros(2, 5), "targets": {"b": torch.zeros(2)}, "index": torch.arange(2)}
    with pytest.raises(ValueError, match="give input of different shapes"):
        merge_task_batches({"a": a, "b": b})


def test_per_task_config_fits_one_step(tmp_path):
    from lightning_mtkd.cli import main

    config = Path(__file__).parents[1] / "configs" / "multimnist" / "per_task.yaml"
    small = [f"--data.init_args.sources.{t}.init_args.{k}={v}" for t in ("left", "right")
             for k, v in (("num_val", 8), ("num_test", 8))]
    cli = main(["fit", "--config", str(config), "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
                "--data.init_args.sources.left.init_args.num_train=64",
                "--data.init_args.sources.right.init_args.num_train=16", "--data.init_args.batch_size=16", *small])
    assert cli.datamodule.batch_sizes() == {"left": 11, "right": 5}  # τ = 0.5: 8:4
    assert "train/loss" in cli.trainer.callback_metrics


def make_student() -> MultiTaskModule:
    return MultiTaskModule(MultiTaskNet(MLPBackbone(in_features=6, hidden=(8,)), heads={"digit": 3, "size": 1}), TASKS)


def even_sources() -> PerTaskDataModule:
    # val splits of 20 and 6: DDP's sampler pads an odd split with a repeated sample, which would shift the mean
    return PerTaskDataModule({"digit": source("digit", 100, 0), "size": source("size", 30, 1)}, batch_size=10,
                             sampling="temperature", tau=0.5)


def _fit(tmp_path, epochs, ckpt_path=None, **kwargs):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(7)
    module = make_student()
    trainer = quick_trainer(tmp_path, max_epochs=epochs, deterministic=True, enable_checkpointing=True,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)], **kwargs)
    trainer.fit(module, even_sources(), ckpt_path=ckpt_path)
    return module, trainer


def test_resume_over_per_task_sources_is_exact(tmp_path):
    """Each source's shuffle is a function of (seed, epoch): a resumed run sees the same batches."""
    straight, _ = _fit(tmp_path / "straight", epochs=3)
    _fit(tmp_path / "interrupted", epochs=2)
    resumed, _ = _fit(tmp_path / "interrupted", epochs=3, ckpt_path="last")
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{key} differs after resume"


@pytest.mark.ddp
def test_ddp_two_processes_over_per_task_sources(tmp_path):
    """Lightning shards every source's loader; the synced metrics are those of each whole val split."""
    module, trainer = _fit(tmp_path, epochs=1, strategy="ddp_spawn", devices=2)
    dm = even_sources()
    dm.setup()
    digit, size = dm.sources["digit"].splits["val"], dm.sources["size"].splits["val"]
    with torch.no_grad():
        acc = (module.model(digit.inputs)["digit"].argmax(1) == digit.targets["digit"]).float().mean()
        mae = (module.model(size.inputs)["size"] - size.targets["size"]).abs().mean()
    torch.testing.assert_close(trainer.callback_metrics["val/digit/acc"], acc)
    torch.testing.assert_close(trainer.callback_metrics["val/size/mae"], mae)


def test_augment_acts_on_the_merged_batch(tmp_path):
    import lightning as L

    from lightning_mtkd.data import BatchAugment

    class BatchSizes(L.Callback):
        def __init__(self):
            self.sizes, self.missing = [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.sizes.append(batch["input"].shape[0])
            self.missing.append(int((batch["targets"]["digit"] == -100).sum()))

    torch.manual_seed(0)
    net = MultiTaskNet(MLPBackbone(in_features=6, hidden=(8,)), heads={"digit": 3, "size": 1})
    teacher = MultiTaskNet(MLPBackbone(in_features=6, hidden=(16,)), heads={"digit": 3, "size": 1})
    augment = BatchAugment(noise=0.1, mixup=1.0, mixup_fraction=1.0, mixup_mode="append")
    dm = two_sources(batch_size=10, sampling="temperature", tau=0.5, augment=augment)
    record = BatchSizes()
    quick_trainer(tmp_path, max_steps=2, callbacks=[record]).fit(SharedDistiller(net, teacher, TASKS), dm)
    # 7 digit + 3 size samples, then 10 mixed ones without labels: 3 + 10 digit targets missing.
    assert record.sizes == [20, 20] and record.missing == [13, 13]
