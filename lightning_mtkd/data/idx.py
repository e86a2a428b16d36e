"""Reading MNIST-format IDX files (gzipped or not): the format of the original MNIST distribution.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <number of dimensions>``, one big-endian
``int32`` per dimension, then the values in C order (LeCun et al., http://yann.lecun.com/exdb/mnist/).
The same files carry Fashion-MNIST, KMNIST and EMNIST.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

#: IDX dtype codes → numpy dtypes (multi-byte types are big-endian).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: File name stems of the MNIST distribution, per split; ``.gz`` is optional, and some mirrors write ``.idx3``.
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file; ``.gz`` files (by name or by content) are decompressed.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x-idx1-ubyte")
        >>> _ = open(path, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(path).tolist()
        [7, 8, 9]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {str(path)!r} does not exist.")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{str(path)!r} is a damaged gzip file ({error}); download it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"{str(path)!r} is not an IDX file: it must start with 0x00 0x00, a dtype code in "
            f"{[hex(c) for c in IDX_DTYPES]} and the number of dimensions (got {raw[:4].hex()})."
        )
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{str(path)!r} is truncated: its header needs {header} bytes, the file has {len(raw)}.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{str(path)!r} declares shape {shape} ({expected} bytes of data) but holds {len(raw) - header} bytes; "
            "the file is truncated or corrupt."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """``stem``, ``stem.gz`` or the ``.idx3-ubyte`` spelling some mirrors use, if present in ``directory``."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_mnist_split(directory: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray] | None:
    """Images ``(N, H, W)`` uint8 and labels ``(N,)`` int64 of one MNIST split (``train`` or ``t10k``).

    Returns ``None`` when neither file of the split is there; raises when only one is, or when they disagree.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"IDX directory {str(directory)!r} does not exist; give the folder holding train-images-idx3-ubyte(.gz) "
            "and train-labels-idx1-ubyte(.gz)."
        )
    image_stem, label_stem = MNIST_FILES[split]
    image_file, label_file = find_idx_file(directory, image_stem), find_idx_file(directory, label_stem)
    if image_file is None and label_file is None:
        return None
    if image_file is None or label_file is None:
        missing = image_stem if image_file is None else label_stem
        raise FileNotFoundError(f"{str(directory)!r} has one file of the {split!r} split but not {missing}(.gz).")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"{image_file.name} must hold images (N, H, W) and {label_file.name} labels (N,); got shapes "
            f"{images.shape} and {labels.shape}."
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{image_file.name} holds {len(images)} images but {label_file.name} holds {len(labels)} labels; "
            "the two files of a split must match (a file from another split or a truncated download?)."
        )
    return images.astype(np.uint8), labels.astype(np.int64)

