"""Throughput of the file-based loaders, on files written here at the real data sets' sizes.

    PYTHONPATH=. python benchmarks/data_loaders.py

Prints, single process (``num_workers=0``; workers divide these times):
- IDX: reading a 60,000-digit gzipped MNIST training file, composing 5,000 MultiMNIST images;
- CelebA: decoding + centre-cropping + resizing a batch of 128 JPEGs of 178×218 to 64×64;
- NYUv2: reading a batch of 8 samples at 288×384 (image, label, depth, normal), and resized to 144×192;
- the per-step cost of merging a two-source ``CombinedLoader`` batch (128 MultiMNIST images).
"""

from __future__ import annotations

import gzip
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def idx(root: Path) -> None:
    from lightning_mtkd.data import MultiMNISTDataModule, read_mnist_split

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 60000).astype(np.uint8)
    for name, array, code in (("train-images-idx3-ubyte.gz", images, 3), ("train-labels-idx1-ubyte.gz", labels, 1)):
        header = bytes([0, 0, 8, code]) + struct.pack(f">{array.ndim}i", *array.shape)
        (root / name).write_bytes(gzip.compress(header + array.tobytes(), compresslevel=1))
    read = timed(lambda: read_mnist_split(root, "train"))
    dm = MultiMNISTDataModule(num_train=5000, num_val=1000, num_test=1000, train_digits=40000, val_digits=10000,
                              test_digits=10000, idx_dir=str(root))
    build = timed(lambda: dm.build_splits(), repeat=1)
    print(f"IDX    read 60,000 gzipped digits: {read * 1e3:7.1f} ms")
    print(f"IDX    compose 7,000 MultiMNIST images from them: {build * 1e3:7.1f} ms")


def celeba(root: Path) -> None:
    from PIL import Image

    from lightning_mtkd.data import CelebADataModule
    from lightning_mtkd.data.celeba import CELEBA_ATTRIBUTES

    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    count = 128
    for i in range(count):
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg", quality=90)
    rows = [f"{i + 1:06d}.jpg " + " ".join(rng.choice(["-1", "1"], 40)) for i in range(count)]
    (root / "list_attr_celeba.txt").write_text("\n".join([str(count), " ".join(CELEBA_ATTRIBUTES), *rows]) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {i % 3}\n" for i in range(count)))
    dm = CelebADataModule(str(root), image_size=64)
    dm.setup()
    train = dm.splits["train"]
    batch = timed(lambda: train.__getitems__(list(range(len(train)))))
    per_image = batch / len(train)
    print(f"CelebA JPEG 178×218 → 64×64: {per_image * 1e3:5.2f} ms/image ({per_image * 128e3:.0f} ms per batch of 128)")


def nyuv2(root: Path) -> None:
    from lightning_mtkd.data import NYUv2DataModule

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for folder, shape in (("image", (288, 384, 3)), ("label", (288, 384)), ("depth", (288, 384, 1)),
                              ("normal", (288, 384, 3))):
            (root / split / folder).mkdir(parents=True)
            for i in range(8):
                np.save(root / split / folder / f"{i}.npy", rng.random(shape, dtype=np.float32))
    for size in (None, (144, 192)):
        dm = NYUv2DataModule(str(root), image_size=size)
        dm.setup()
        batch = timed(lambda dm=dm: dm.splits["train"].__getitems__(list(range(8))))
        print(f"NYUv2  batch of 8 at 288×384{' → 144×192' if size else '          '}: {batch * 1e3:7.1f} ms")


def merge() -> None:
    from lightning_mtkd import Task
    from lightning_mtkd.data import merge_task_batches

    tasks = {"left": Task("left", num_classes=10), "right": Task("right", num_classes=10)}
    part = lambda n, t: {"input": torch.rand(n, 1, 36, 36), "targets": {t: torch.randint(0, 10, (n,))},  # noqa: E731
                         "index": torch.arange(n)}
    batch = {"left": part(96, "left"), "right": part(32, "right")}
    per_call = timed(lambda: [merge_task_batches(batch, tasks) for _ in range(1000)]) / 1000
    print(f"merge  two per-task batches (96 + 32 images 36×36): {per_call * 1e6:7.1f} µs per step")


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "mnist").mkdir()
        idx(Path(tmp) / "mnist")
        celeba(Path(tmp) / "celeba")
        nyuv2(Path(tmp) / "nyuv2")
        merge()
