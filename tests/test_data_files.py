"""File-based loaders, each read from small files the test writes in the published layout."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quick_trainer

from lightning_mtkd import MultiTaskModule, Task
from lightning_mtkd.data import CSVMultiTaskDataModule, MultiMNISTDataModule, read_idx
from lightning_mtkd.models import MLPBackbone, MultiTaskNet

# ----------------------------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX as LeCun's page describes it, written by hand: 0, 0, dtype code, ndim, big-endian dims, data."""
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    dims = struct.pack(f">{array.ndim}i", *array.shape)
    data = array.astype(array.dtype.newbyteorder(">")).tobytes()
    return bytes([0, 0, code, array.ndim]) + dims + data


def write_mnist(folder, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(exist_ok=True)
    for stem, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
        raw = idx_bytes(array)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(raw) if gz else raw)


def fake_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct 28×28 "digits": each carries its id in its first pixels, so its source can be traced."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(count) // 256, np.arange(count) % 256
    return images, rng.integers(0, 10, count).astype(np.uint8)


def test_read_idx_plain_gzip_and_int32(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(array)))
    wide = np.array([-5, 70000], dtype=np.int32)
    (tmp_path / "c").write_bytes(idx_bytes(wide))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "c"), wide)


@pytest.mark.parametrize("gz", [False, True])
def test_multimnist_composes_from_idx_files(tmp_path, gz):
    images, labels = fake_digits(300, seed=0)
    test_images, test_labels = fake_digits(100, seed=1)
    test_images[:, 0, 0] = 255  # marks MNIST's own test digits
    write_mnist(tmp_path, "train", images, labels, gz)
    write_mnist(tmp_path, "t10k", test_images, test_labels, gz)
    dm = MultiMNISTDataModule(num_train=64, num_val=16, num_test=16, train_digits=200, val_digits=100,
                              test_digits=100, shift=28, idx_dir=str(tmp_path))
    dm.setup()
    for split in ("train", "val", "test"):
        left = (dm.splits[split].inputs[:, 0, :28, :28] * 255).round().to(torch.uint8).numpy()
        ids = left[:, 0, 0].astype(int) * 256 + left[:, 0, 1]
        if split == "test":  # from t10k, and labelled by it
            assert (left[:, 0, 0] == 255).all()
            np.testing.assert_array_equal(dm.splits[split].targets["left"], test_labels[left[:, 0, 1]])
        else:
            assert (left[:, 0, 0] < 255).all()
            np.testing.assert_array_equal(dm.splits[split].targets["left"], labels[ids])
            np.testing.assert_array_equal(left, images[ids])


def test_idx_mirror_spelling(tmp_path):
    """Some mirrors name the files train-images.idx3-ubyte; they are found too."""
    from lightning_mtkd.data import read_mnist_split

    images, labels = fake_digits(5, seed=0)
    (tmp_path / "train-images.idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels.idx1-ubyte").write_bytes(idx_bytes(labels))
    read_images, read_labels = read_mnist_split(tmp_path, "train")
    np.testing.assert_array_equal(read_images, images)
    assert read_labels.dtype == np.int64 and read_labels.tolist() == labels.tolist()
    assert read_mnist_split(tmp_path, "t10k") is None


def test_idx_pools_are_disjoint_without_t10k(tmp_path):
    images, labels = fake_digits(300, seed=0)
    write_mnist(tmp_path, "train", images, labels, gz=False)
    dm = MultiMNISTDataModule(num_train=200, num_val=100, num_test=100, train_digits=100, val_digits=100,
                              test_digits=100, shift=28, idx_dir=str(tmp_path))
    dm.setup()

    def sources(split):
        left = (dm.splits[split].inputs[:, 0, 0, :2] * 255).round().long()
        return set((left[:, 0] * 256 + left[:, 1]).tolist())

    assert not sources("train") & sources("val") and not sources("train") & sources("test")
    assert not sources("val") & sources("test")
    with pytest.raises(ValueError, match="train_digits=200, but only 100"):
        MultiMNISTDataModule(train_digits=200, val_digits=100, test_digits=100, idx_dir=str(tmp_path)).setup()


def test_bad_idx_files(tmp_path):
    images, labels = fake_digits(10, seed=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MultiMNISTDataModule(idx_dir=str(tmp_path / "nowhere")).setup()
    write_mnist(tmp_path, "train", images, labels[:9], gz=False)  # mismatched counts
    with pytest.raises(ValueError, match="10 images but .* 9 labels"):
        MultiMNISTDataModule(train_digits=4, val_digits=2, test_digits=2, idx_dir=str(tmp_path)).setup()
    raw = idx_bytes(images)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-7])  # truncated
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04garbage")  # not IDX at all
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw)[:40])  # damaged gzip
    with pytest.raises(ValueError, match="damaged gzip"):
        read_idx(tmp_path / "x.gz")
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="not train-images-idx3-ubyte"):
        MultiMNISTDataModule(idx_dir=str(tmp_path)).setup()


# ----------------------------------------------------------------------------------------------- CSV

CSV_TEXT = """id,age,height,species,weight
1,3.0,10,cat,4.5
2,5.0,20,dog,
3,7.0,30,,6.5
4,9.0,40,dog,7.5
5,11.0,50,cat,NA
6,13.0,60,bird,9.5
"""


def test_csv_columns_kinds_and_missing_labels(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text(CSV_TEXT)
    dm = CSVMultiTaskDataModule(str(path), targets={"species": "classification", "weight": "regression"},
                                drop=["id"], val=str(path), test=str(path), standardize=False)
    dm.setup()
    data = dm.splits["val"]
    torch.testing.assert_close(data.inputs, torch.tensor([[3.0, 10], [5, 20], [7, 30], [9, 40], [11, 50], [13, 60]]))
    assert dm.classes["species"] == ["bird", "cat", "dog"] and dm.num_classes == {"species": 3, "weight": 1}
    assert data.targets["species"].tolist() == [1, 2, -100, 2, 1, 0]
    weight = data.targets["weight"][:, 0]
    assert weight.shape == (6,) and torch.isnan(weight[[1, 4]]).all()
    torch.testing.assert_close(weight[[0, 2, 3, 5]], torch.tensor([4.5, 6.5, 7.5, 9.5]))


def test_csv_random_split_standardizes_on_train_and_fits(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["f0;f1;f2;label;score"] + [
        f"{a:.3f};{b:.3f};{c:.3f};{int(a > 0)};{'' if i % 7 == 0 else f'{a + b:.3f}'}"
        for i, (a, b, c) in enumerate(rng.normal(size=(50, 3)) * [1, 10, 100] + 5)
    ]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(rows) + "\n")
    dm = CSVMultiTaskDataModule(str(path), targets={"label": "classification", "score": "regression"},
                                delimiter=";", val_fraction=0.2, test_fraction=0.2, batch_size=8)
    dm.setup()
    sizes = {split: len(ds) for split, ds in dm.splits.items()}
    assert sizes == {"train": 30, "val": 10, "test": 10}
    train = dm.splits["train"].inputs
    torch.testing.assert_close(train.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert dm.in_features == 3 and dm.num_classes == {"label": 2, "score": 1}
    net = MultiTaskNet(MLPBackbone(in_features=dm.in_features, hidden=(8,)), heads=dm.num_classes)
    tasks = [Task("label", num_classes=2), Task("score", kind="regression", num_classes=1)]
    trainer = quick_trainer(tmp_path, max_epochs=1)
    trainer.fit(MultiTaskModule(net, tasks), dm)
    assert torch.isfinite(trainer.callback_metrics["val/score/mae"])


def test_csv_integer_classes_keep_their_value(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("x,y\n1,3\n2,1\n3,\n")
    dm = CSVMultiTaskDataModule(str(path), targets={"y": "classification"}, val=str(path), test=str(path))
    dm.setup()
    assert dm.num_classes["y"] == 4 and dm.splits["val"].targets["y"].tolist() == [3, 1, -100]


def test_bad_csv_files(tmp_path):
    path = tmp_path / "t.csv"
    kwargs = dict(targets={"y": "classification"}, val=str(path), test=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CSVMultiTaskDataModule(str(tmp_path / "none.csv"), **kwargs).setup()
    path.write_text("x,y\n1,a\n2\n")
    with pytest.raises(ValueError, match="line 3: 1 cells but the header names 2"):
        CSVMultiTaskDataModule(str(path), **kwargs).setup()
    path.write_text("x,y\n1,a\n,b\n")
    with pytest.raises(ValueError, match="feature 'x' is missing on data row"):
        CSVMultiTaskDataModule(str(path), **kwargs).setup()
    path.write_text("x,y\n1,a\nhigh,b\n")
    with pytest.raises(ValueError, match="'high' is not a number"):
        CSVMultiTaskDataModule(str(path), **kwargs).setup()
    path.write_text("x,z\n1,a\n")
    with pytest.raises(KeyError, match=r"no column\(s\) \['y'\]"):
        CSVMultiTaskDataModule(str(path), **kwargs).setup()
    with pytest.raises(ValueError, match="'classification' or 'regression'"):
        CSVMultiTaskDataModule(str(path), targets={"y": "ordinal"})  # type: ignore[dict-item]


# ----------------------------------------------------------------------------------------------- CelebA

CELEBA_NAMES = ["5_o_Clock_Shadow", "Male", "Smiling"]


def write_celeba(root, count: int = 6, width: int = 20, height: int = 24, names=CELEBA_NAMES) -> np.ndarray:
    """The published layout: img_align_celeba/*.jpg, list_attr_celeba.txt, list_eval_partition.txt."""
    from PIL import Image

    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    values = rng.choice([-1, 1], size=(count, len(names)))
    for i in range(count):
        pixels = np.full((height, width, 3), 30 * i, dtype=np.uint8)
        pixels[:2], pixels[-2:] = 255, 255  # bands a centre crop of `width` rows removes
        Image.fromarray(pixels).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg", quality=95)
    lines = [str(count), " ".join(names) + " "]
    lines += [f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in row) for i, row in enumerate(values)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    partition = [0, 0, 0, 1, 1, 2][:count] + [0] * max(0, count - 6)
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(partition)))
    return values


def test_celeba_binary_tasks_subset_and_crop(tmp_path):
    from lightning_mtkd.data import CelebADataModule

    values = write_celeba(tmp_path)
    dm = CelebADataModule(str(tmp_path), attributes=["Smiling", "Male"], mode="binary", image_size=10, crop=20,
                          batch_size=3)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 3, "val": 2, "test": 1}
    small = CelebADataModule(str(tmp_path), max_samples=2)
    small.setup()
    assert {k: len(v) for k, v in small.splits.items()} == {"train": 2, "val": 2, "test": 1}
    assert [(t.name, t.kind, t.num_classes) for t in dm.tasks()] == [("Smiling", "classification", 2),
                                                                      ("Male", "classification", 2)]
    batch = next(iter(dm.val_dataloader()))
    assert batch["input"].shape == (2, 3, 10, 10) and batch["input"].dtype == torch.float32
    # the white bands were cropped away: every pixel is the image's grey level (JPEG-close)
    expected = torch.tensor([90.0, 120.0]).view(2, 1, 1, 1) / 255
    torch.testing.assert_close(batch["input"], expected.expand(2, 3, 10, 10), atol=4 / 255, rtol=0)
    assert batch["targets"]["Smiling"].tolist() == ((values[3:5, 2] + 1) // 2).tolist()
    assert batch["targets"]["Male"].tolist() == ((values[3:5, 1] + 1) // 2).tolist()


def test_celeba_multilabel_fits_one_step(tmp_path):
    from lightning_mtkd.data import CelebADataModule
    from lightning_mtkd.models import ConvBackbone

    values = write_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000001.jpg").rename(tmp_path / "moved.jpg")  # Kaggle's nested folder
    nested = tmp_path / "img_align_celeba" / "img_align_celeba"
    nested.mkdir()
    for f in [*sorted((tmp_path / "img_align_celeba").glob("*.jpg")), tmp_path / "moved.jpg"]:
        f.rename(nested / ("000001.jpg" if f.name == "moved.jpg" else f.name))
    dm = CelebADataModule(str(tmp_path), image_size=16, crop=None, batch_size=2)
    dm.setup()
    (task,) = dm.tasks()
    assert (task.name, task.kind, task.num_classes) == ("attributes", "multilabel", 3)
    batch = dm.splits["train"].gather([0, 2])
    assert batch["targets"]["attributes"].tolist() == ((values[[0, 2]] + 1) // 2).tolist()
    net = MultiTaskNet(ConvBackbone(in_channels=3, widths=(4,), hidden=8), heads={"attributes": 3})
    trainer = quick_trainer(tmp_path, max_epochs=1)
    trainer.fit(MultiTaskModule(net, dm.tasks()), dm)
    assert "val/attributes/f1" in trainer.callback_metrics


def test_bad_celeba_folders(tmp_path):
    from lightning_mtkd.data import CelebADataModule

    with pytest.raises(FileNotFoundError, match="does not exist"):
        CelebADataModule(str(tmp_path / "none")).setup()
    write_celeba(tmp_path)
    with pytest.raises(ValueError, match=r"unknown CelebA attribute\(s\) \['Smilling'\]"):
        CelebADataModule(str(tmp_path), attributes=["Smilling"]).setup()
    (tmp_path / "img_align_celeba" / "000004.jpg").write_bytes(b"not a jpeg")
    dm = CelebADataModule(str(tmp_path), batch_size=2)
    dm.setup()
    with pytest.raises(ValueError, match="000004.jpg' cannot be decoded"):
        next(iter(dm.val_dataloader()))
    (tmp_path / "img_align_celeba" / "000004.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 6 images .* \(first: \[.000004.jpg.\]\)"):
        CelebADataModule(str(tmp_path)).setup()
    attr = tmp_path / "list_attr_celeba.txt"
    attr.write_text(attr.read_text().replace("6\n", "7\n", 1))  # the count says 7, six are listed
    with pytest.raises(ValueError, match="announces 7 images on line 1 but lists 6"):
        CelebADataModule(str(tmp_path)).setup()
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    attr.write_text(attr.read_text().replace("7\n", "6\n", 1))
    (tmp_path / "img_align_celeba" / "000004.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"5 image\(s\) of list_attr_celeba.txt have no line in list_eval_partition"):
        CelebADataModule(str(tmp_path)).setup()
    import shutil

    shutil.rmtree(tmp_path / "img_align_celeba")
    with pytest.raises(FileNotFoundError, match="no img_align_celeba/ folder"):
        CelebADataModule(str(tmp_path)).setup()


# ----------------------------------------------------------------------------------------------- configs

CONFIGS = Path(__file__).parents[1] / "configs"


def cli_fit(config: str, tmp_path, *extra: str):
    from lightning_mtkd.cli import main

    args = ["fit", "--config", str(CONFIGS / config), "--trainer.fast_dev_run=1"]
    args.append(f"--trainer.default_root_dir={tmp_path}")
    return main([*args, *extra])


def test_csv_config_fits_one_step(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["id,a,b,c,d,label,score"] + [
        f"{i},{a:.3f},{b:.3f},{c:.3f},{d:.3f},{['x', 'y', 'z'][i % 3]},{'' if i % 5 == 0 else f'{a * b:.3f}'}"
        for i, (a, b, c, d) in enumerate(rng.normal(size=(40, 4)))
    ]
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    table = f"--data.init_args.train={tmp_path / 'table.csv'}"
    cli = cli_fit("csv/mlp.yaml", tmp_path, table, "--data.init_args.batch_size=8")
    assert cli.datamodule.num_classes == {"label": 3, "score": 1}
    assert "train/loss" in cli.trainer.callback_metrics


CELEBA_SMALL = ["--data.init_args.crop=null", "--data.init_args.image_size=16", "--data.init_args.num_workers=0",
                "--data.init_args.batch_size=2"]


@pytest.mark.parametrize("name", ["teacher.yaml", "scratch.yaml", "binary.yaml"])
def test_celeba_training_configs_fit_one_step(name, tmp_path):
    from lightning_mtkd.data.celeba import CELEBA_ATTRIBUTES

    write_celeba(tmp_path / "celeba", names=CELEBA_ATTRIBUTES)
    cli = cli_fit(f"celeba/{name}", tmp_path, f"--data.init_args.root={tmp_path / 'celeba'}", *CELEBA_SMALL)
    assert "train/loss" in cli.trainer.callback_metrics


def test_celeba_shared_config_fits_one_step(tmp_path):
    from lightning_mtkd.data import CelebADataModule
    from lightning_mtkd.data.celeba import CELEBA_ATTRIBUTES
    from lightning_mtkd.models import ConvBackbone

    write_celeba(tmp_path / "celeba", names=CELEBA_ATTRIBUTES)
    dm = CelebADataModule(str(tmp_path / "celeba"), image_size=16, batch_size=2)
    net = MultiTaskNet(ConvBackbone(in_channels=3, widths=(8, 16), hidden=32), heads={"attributes": 40})
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(MultiTaskModule(net, dm.tasks()), dm)
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    cli = cli_fit("celeba/shared.yaml", tmp_path, f"--model.init_args.teacher={tmp_path / 'teacher.ckpt'}",
                  f"--data.init_args.root={tmp_path / 'celeba'}", *CELEBA_SMALL)
    assert "train/hint" in cli.trainer.callback_metrics


def test_csv_unlabelled_rows_hidden_labels_and_augment_reach_distillation(tmp_path):
    """Rows with every target empty stay in the training split with all labels missing (only distillation
    reaches them); hide_labels and a BatchAugment are taken as by every MultiTaskDataModule."""
    from lightning_mtkd import SharedDistiller
    from lightning_mtkd.data import BatchAugment

    rng = np.random.default_rng(1)
    rows = ["a,b,label,score"] + [
        f"{a:.3f},{b:.3f},{'' if i >= 40 else int(a > 0)},{'' if i >= 40 else f'{a - b:.3f}'}"
        for i, (a, b) in enumerate(rng.normal(size=(60, 2)))
    ]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(rows) + "\n")
    test = tmp_path / "test.csv"
    test.write_text("\n".join(rows[:21]) + "\n")
    dm = CSVMultiTaskDataModule(str(path), targets={"label": "classification", "score": "regression"},
                                val=str(test), test=str(test), hide_labels={"score": 0.5},
                                augment=BatchAugment(noise=0.1), batch_size=16)
    dm.setup()
    train = dm.splits["train"].targets
    unlabelled = (train["label"] == -100) & torch.isnan(train["score"][:, 0])
    assert int(unlabelled.sum()) == 20  # the 20 empty rows; rows whose score is hidden keep their class label
    assert int((train["label"] != -100).sum()) == 40
    # a seeded half of the 60 training rows lose their score (some of them were empty already)
    assert 30 <= int(torch.isnan(train["score"][:, 0]).sum()) < 50
    tasks = [Task("label", num_classes=2), Task("score", kind="regression", num_classes=1)]
    net = lambda: MultiTaskNet(MLPBackbone(in_features=2, hidden=(8,)), heads={"label": 2, "score": 1})  # noqa: E731
    module = SharedDistiller(net(), net(), tasks, alpha=0.5)
    trainer = quick_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_celeba_multilabel_distils_on_consistently_augmented_batches(tmp_path):
    from lightning_mtkd import SharedDistiller
    from lightning_mtkd.data import BatchAugment, CelebADataModule
    from lightning_mtkd.models import ConvBackbone

    write_celeba(tmp_path)
    augment = BatchAugment(shift=2, mixup=1.0, mixup_mode="append")
    dm = CelebADataModule(str(tmp_path), image_size=16, crop=None, batch_size=2, augment=augment)
    net = lambda width: MultiTaskNet(ConvBackbone(in_channels=3, widths=(width,), hidden=8), heads={"attributes": 3})  # noqa: E731
    torch.manual_seed(0)
    module = SharedDistiller(net(4), net(8), dm.tasks())
    trainer = quick_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, dm)
    assert dm.augment is augment
    assert torch.isfinite(trainer.callback_metrics["train/attributes/kd"])
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
