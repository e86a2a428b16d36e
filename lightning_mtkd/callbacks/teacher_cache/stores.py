"""Where a split's cached teacher outputs live: the layout of its arrays, and the memory and disk stores.

A split's cache is one contiguous array per teacher output (task logits and every tapped feature)
with ``num_samples`` rows, and a ``filled`` mask; a batch is gathered from them by index. In
memory the arrays sit on the module's device; on disk they are views of one memory-mapped file
(:mod:`~lightning_mtkd.callbacks.teacher_cache.file_format`) that all ranks of a machine share.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_mtkd.callbacks.teacher_cache.file_format import (
    ALIGN,
    HEADER_BYTES,
    checksum,
    create_file,
    file_problem,
    read_header,
    write_header,
)

if TYPE_CHECKING:
    from lightning_mtkd.strategies.base import ModelOutputs

Split = Literal["train", "val", "test"]
FeatureDtype = Literal["same", "float16", "bfloat16"]
_FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class _Layout:
    """Which arrays a split's cache holds, how teacher outputs map onto them, and where they sit in a file."""

    def __init__(self, num_samples: int, structure: dict[str, Any], arrays: dict[str, dict[str, Any]]) -> None:
        self.num_samples = num_samples
        self.structure = structure  # {teacher: {"outputs": {task: key}, "features": {path: spec}}}
        self.arrays = arrays  # key -> {"shape": per-sample shape, "dtype": stored, "as": returned dtype, "offset"}
        offset = 0
        for key in sorted(self.arrays):  # in key order: the header is written with sorted keys and read back
            spec = self.arrays[key]
            spec["offset"] = offset
            offset += _aligned(self.row_bytes(spec) * num_samples)
        self.mask_offset = offset
        self.data_bytes = offset + num_samples

    @classmethod
    def from_results(
        cls, results: Mapping[str, ModelOutputs], num_samples: int, feature_dtype: FeatureDtype
    ) -> _Layout:
        structure: dict[str, Any] = {}
        tensors: dict[str, Tensor] = {}
        for name, result in results.items():
            outputs = {task: _flatten(out, f"{name}/outputs/{task}", tensors) for task, out in result.outputs.items()}
            features = {path: _flatten(f, f"{name}/features/{path}", tensors) for path, f in result.features.items()}
            structure[name] = {"outputs": outputs, "features": features}
        arrays = {}
        for key, tensor in tensors.items():
            stored = tensor.dtype
            if "/features/" in key and feature_dtype != "same" and tensor.is_floating_point():
                stored = _FEATURE_DTYPES[feature_dtype]
            arrays[key] = {
                "shape": list(tensor.shape[1:]),
                "dtype": _dtype_name(stored),
                "as": _dtype_name(tensor.dtype),
            }
        return cls(num_samples, structure, arrays)

    @property
    def nbytes(self) -> int:
        return self.data_bytes

    @staticmethod
    def row_bytes(spec: Mapping[str, Any]) -> int:
        return math.prod(spec["shape"]) * _dtype(spec["dtype"]).itemsize

    def describe(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "structure": self.structure, "arrays": self.arrays}

    def unflatten(self, arrays: Mapping[str, Tensor]) -> dict[str, ModelOutputs]:
        from lightning_mtkd.strategies.base import ModelOutputs

        return {
            name: ModelOutputs(
                {task: _unflatten(spec, arrays) for task, spec in parts["outputs"].items()},
                {path: _unflatten(spec, arrays) for path, spec in parts["features"].items()},
            )
            for name, parts in self.structure.items()
        }

    def flatten(self, results: Mapping[str, ModelOutputs]) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for name, result in results.items():
            for task, value in result.outputs.items():
                _flatten(value, f"{name}/outputs/{task}", tensors)
            for path, value in result.features.items():
                _flatten(value, f"{name}/features/{path}", tensors)
        if tensors.keys() != self.arrays.keys():
            raise RuntimeError(
                f"teacher cache: the teachers' outputs changed shape between batches (cached {sorted(self.arrays)}, "
                f"now {sorted(tensors)}); outputs must be the same for every batch to be cached."
            )
        return tensors


class _Store:
    """One split's arrays (``num_samples`` rows each) and its ``filled`` mask."""

    split: Split
    layout: _Layout
    arrays: dict[str, Tensor]
    filled: Tensor
    complete: bool = False
    index_checked: bool = False

    def gather(self, index: Tensor) -> dict[str, ModelOutputs]:
        rows = {key: self._rows(array, index, self.layout.arrays[key]["as"]) for key, array in self.arrays.items()}
        return self.layout.unflatten(rows)

    def _rows(self, array: Tensor, index: Tensor, as_dtype: str) -> Tensor:
        return array.index_select(0, index).to(_dtype(as_dtype))

    def all_filled(self, index: Tensor) -> bool:
        return bool(self.filled[index.to(self.filled.device)].all())  # a sync, but only while filling

    def filled_mask(self) -> Tensor:
        return self.filled.bool()

    def check_index(self, index: Tensor) -> None:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= self.layout.num_samples:
            raise IndexError(
                f"teacher cache ({self.split}): batch['index'] holds {low}..{high}, but the data set has "
                f"{self.layout.num_samples} samples. 'index' must be each sample's position in its own dataset."
            )
        self.index_checked = True

    def write(self, index: Tensor, results: Mapping[str, ModelOutputs]) -> None:
        index = index.to(self.filled.device)
        for key, tensor in self.layout.flatten(results).items():
            array = self.arrays[key]
            array[index] = tensor.detach().to(device=array.device, dtype=array.dtype)
        self.filled[index] = True  # after the rows: a row marked filled is always whole

    def try_complete(self, strategy: Any) -> None:
        self.complete = bool(self.filled.all())

    def close(self) -> None:
        self.arrays = {}


class _MemoryStore(_Store):
    def __init__(self, split: Split, layout: _Layout, device: torch.device) -> None:
        self.split, self.layout = split, layout
        n = layout.num_samples
        self.arrays = {
            key: torch.empty((n, *spec["shape"]), dtype=_dtype(spec["dtype"]), device=device)
            for key, spec in layout.arrays.items()
        }
        self.filled = torch.zeros(n, dtype=torch.bool, device=device)

    def load_file(self, path: str, fingerprint: str) -> bool:
        """Fill every row from the complete cache file of this fingerprint at ``path``, if there is an undamaged
        one (written by ``lightning-mtkd cache`` or a run with ``storage="disk"``); a damaged one is ignored."""
        problem = file_problem(path, fingerprint, self.layout)
        if problem is not None:
            if problem != "missing":
                warnings.warn(f"teacher cache {path}: {problem}; not used, computing the outputs.", stacklevel=3)
            return False
        disk = _DiskStore(self.split, self.layout, path, writable=False)
        for key, array in self.arrays.items():
            array.copy_(disk.arrays[key])
        disk.close()
        self.filled.fill_(True)
        self.complete = True
        return True


class _DiskStore(_Store):
    """The arrays as views of one memory-mapped file: ``[header | array | array | … | filled mask]``."""

    def __init__(self, split: Split, layout: _Layout, path: str, writable: bool) -> None:
        self.split, self.layout, self.path = split, layout, path
        self._map: Any = np.memmap(path, dtype=np.uint8, mode="r+" if writable else "r")
        with warnings.catch_warnings():  # a read-only map is never written: complete caches are only gathered
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(self._map[HEADER_BYTES:])
        n = layout.num_samples
        self.arrays = {}
        for key, spec in layout.arrays.items():
            size = _Layout.row_bytes(spec) * n
            region = raw[spec["offset"] : spec["offset"] + size]
            self.arrays[key] = region.view(_dtype(spec["dtype"])).view(n, *spec["shape"])
        self.filled = raw[layout.mask_offset : layout.mask_offset + n]

    @classmethod
    def open(cls, split: Split, layout: _Layout, path: str, fingerprint: str, strategy: Any) -> _DiskStore:
        """Open (rank 0: validate, else rebuild) the file of this fingerprint; all ranks then map it."""
        if strategy.is_global_zero:
            problem = file_problem(path, fingerprint, layout)
            if problem is not None:
                if problem != "missing":
                    warnings.warn(f"teacher cache {path}: {problem}; rebuilding it.", stacklevel=3)
                create_file(path, fingerprint, layout)
        strategy.barrier("teacher_cache_open")
        complete = read_header(path)["complete"]
        store = cls(split, layout, path, writable=not complete)
        store.complete = complete
        return store

    def _rows(self, array: Tensor, index: Tensor, as_dtype: str) -> Tensor:
        return array.index_select(0, index.cpu()).to(device=index.device, dtype=_dtype(as_dtype), non_blocking=True)

    def write(self, index: Tensor, results: Mapping[str, ModelOutputs]) -> None:
        super().write(index.cpu(), results)

    def all_filled(self, index: Tensor) -> bool:
        return bool(self.filled[index.cpu()].all())

    def try_complete(self, strategy: Any) -> None:
        """Every rank's rows flushed; if all are filled, rank 0 writes the checksum and marks the file complete."""
        self._map.flush()
        strategy.barrier("teacher_cache_flush")
        if strategy.is_global_zero and bool(self.filled.all()):
            header = read_header(self.path)
            header.update(complete=True, checksum=checksum(self._map))
            write_header(self.path, header)
        strategy.barrier("teacher_cache_complete")
        self.complete = bool(read_header(self.path)["complete"])

    def close(self) -> None:
        super().close()
        self.filled = torch.empty(0)
        if self._map is not None and self._map.mode == "r+":
            self._map.flush()
        self._map = None


def read_cache_file(path: str) -> dict[str, Tensor]:
    """The arrays of a complete, undamaged cache file, by key (``"<teacher>/outputs/<task>"``,
    ``"<teacher>/features/<path>"``), one row per sample in index order: for inspection and tests."""
    header = read_header(path)
    spec = header["layout"]
    layout = _Layout(spec["num_samples"], spec["structure"], spec["arrays"])
    problem = file_problem(path, header["fingerprint"], layout)
    if problem is not None:
        raise ValueError(f"teacher cache {path}: {problem}.")
    store = _DiskStore("train", layout, path, writable=False)
    arrays = {key: array.clone() for key, array in store.arrays.items()}
    store.close()
    return arrays


def _flatten(value: Any, key: str, out: dict[str, Tensor]) -> Any:
    """Record the tensors of one output (a Tensor, or a tuple/list with ``None``s) under keys; return its spec."""
    if isinstance(value, Tensor):
        out[key] = value
        return key
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        items = [_flatten(v, f"{key}#{i}", out) for i, v in enumerate(value)]
        return {"items": items, "tuple": isinstance(value, tuple)}
    raise TypeError(
        f"teacher cache: cannot store {key!r}, a {type(value).__name__}; teacher outputs and tapped features must be "
        "tensors (or tuples of them)."
    )


def _unflatten(spec: Any, arrays: Mapping[str, Tensor]) -> Any:
    if isinstance(spec, str):
        return arrays[spec]
    if spec is None:
        return None
    items = [_unflatten(s, arrays) for s in spec["items"]]
    return tuple(items) if spec["tuple"] else items


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"teacher cache: unknown dtype {name!r} in the layout")
    return dtype
