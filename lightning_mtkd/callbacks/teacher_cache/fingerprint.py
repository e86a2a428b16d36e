"""What a cache file's numbers depend on, as one digest: the teachers' weights, the data set, the layout, the precision.

A file is named after this fingerprint, so a change to any of them makes a new file and nothing stale
is ever reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_mtkd.callbacks.teacher_cache.file_format import FORMAT_VERSION
from lightning_mtkd.config import class_path
from lightning_mtkd.data.base import MultiTaskDataset, fetch_samples, unwrap_dataset


def cache_fingerprint(
    split: str, precision: str, layout: Mapping[str, Any], dataset: Dataset, teachers: Mapping[str, nn.Module]
) -> str:
    """The digest of one split's cache: format version, split, trainer precision, layout (which outputs and
    features, their shapes and storage dtypes), :func:`dataset_fingerprint`, and every teacher's class,
    weights and buffers."""
    digest = hashlib.blake2b(digest_size=16)
    described = {
        "version": FORMAT_VERSION,
        "split": split,
        "precision": precision,
        "layout": layout,
        "data": dataset_fingerprint(dataset),
        "teachers": sorted(teachers),
    }
    digest.update(json.dumps(described, sort_keys=True).encode())
    for name, teacher in sorted(teachers.items()):
        digest.update(f"{name}:{class_path(teacher)}".encode())
        for key, value in teacher.state_dict().items():
            digest.update(key.encode())
            _update_with_tensor(digest, value)
    return digest.hexdigest()


def dataset_fingerprint(dataset: Dataset) -> str:
    """A digest of what a data set feeds the teachers: its inputs (and transform), not its labels.

    A data set may define ``cache_fingerprint() -> str`` itself. A :class:`MultiTaskDataset` is
    hashed whole; any other data set by its type, length, ``transform`` and the inputs of up to
    256 evenly spaced samples (define ``cache_fingerprint`` where that could miss a change).
    """
    dataset = unwrap_dataset(dataset)
    custom = getattr(dataset, "cache_fingerprint", None)
    if callable(custom):
        return str(custom())
    digest = hashlib.blake2b(digest_size=16)
    n = len(dataset)  # type: ignore[arg-type]
    digest.update(f"{class_path(dataset)}:{n}:{getattr(dataset, 'transform', None)!r}".encode())
    if isinstance(dataset, MultiTaskDataset):
        for tensor in _tensors(dataset.inputs):  # every leaf of a dict of inputs
            _update_with_tensor(digest, tensor)
    else:
        indices = sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, 256))})
        for tensor in _tensors(_inputs_of(_fetch(dataset, indices, None))):
            _update_with_tensor(digest, tensor)
    return digest.hexdigest()


def _update_with_tensor(digest: Any, tensor: Tensor) -> None:
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _fetch(dataset: Dataset, indices: list[int], collate: Any) -> Any:
    """Samples ``indices`` as the DataLoader would fetch them, without its sampler."""
    return fetch_samples(dataset, indices, collate)


def _inputs_of(batch: Any) -> Any:
    return batch["input"] if isinstance(batch, Mapping) and "input" in batch else batch


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
