"""Tabular multi-task data from CSV files: feature columns in, one named target column per task.

A CSV cell that is empty or reads ``NA``/``NaN``/``null``/``?`` in a target column is a missing label
(``-100`` for a classification task, ``NaN`` for regression) and is masked out of that task's loss and
metrics; a missing feature is an error (impute it first: the model has no way to read a hole).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_mtkd.data.augment import BatchAugment
from lightning_mtkd.data.base import MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.tasks import IGNORE_INDEX

TargetKind = Literal["classification", "regression"]

#: Cell values read as "missing" (case-insensitive, surrounding spaces ignored).
MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})


def read_csv_columns(path: str | Path, delimiter: str = ",") -> dict[str, list[str]]:
    """The columns of a CSV file with a header row, as ``{column: [cell, ...]}`` (cells stripped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {str(path)!r} does not exist.")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{str(path)!r} is empty; it needs a header row naming the columns, then one row per sample.")
    header = [name.strip() for name in rows[0]]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise ValueError(f"{str(path)!r}: column name(s) {duplicates} appear more than once in the header.")
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(
                f"{str(path)!r}, line {number}: {len(row)} cells but the header names {len(header)} columns "
                "(a stray delimiter or an unquoted comma?)."
            )
    return {name: [row[i].strip() for row in rows[1:]] for i, name in enumerate(header)}


def _is_missing(cell: str) -> bool:
    return cell.lower() in MISSING


def _as_float(cell: str, where: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"{where}: {cell!r} is not a number.") from None


def class_vocabulary(cells: Sequence[str]) -> list[str]:
    """The classes of a classification column, in label order.

    Non-negative integer labels keep their value (``"3"`` is class 3, so the classes are ``0..max``);
    any other labels (``"cat"``, ``"dog"``) are numbered in sorted order.
    """
    present = sorted({cell for cell in cells if not _is_missing(cell)})
    if present and all(cell.isdigit() for cell in present):
        return [str(i) for i in range(max(int(cell) for cell in present) + 1)]
    return present


class CSVMultiTaskDataModule(MultiTaskDataModule):
    """Feature columns → named target columns, each a classification or a regression task.

    Give one CSV (``train``) and it is split at random into train / val / test by ``val_fraction`` and
    ``test_fraction``; give ``val`` and ``test`` files to use your own splits. Features are
    standardised with the training split's mean and standard deviation (``standardize``). The
    classes of each classification column are read from all the files together (see
    :func:`class_vocabulary`); after ``setup()``, ``num_classes`` and ``classes`` hold them per task,
    and ``in_features`` the input width, which is what the model's heads and ``MLPBackbone`` need.

    Args:
        train: Path of the training CSV (or of the only CSV).
        targets: ``{column: "classification" | "regression"}``; each column becomes a task of that name.
        features: Feature columns; ``None`` takes every column that is not a target (nor in ``drop``).
        val, test: Optional CSVs of the other splits (same columns).
        val_fraction, test_fraction: Shares of ``train`` held out when ``val`` / ``test`` are not given.
        drop: Columns to ignore (ids, free text) when ``features`` is ``None``.
        standardize: Scale features to zero mean and unit variance on the training split.
        delimiter: The CSV's field separator.
        batch_size, num_workers, pin_memory, seed, hide_labels, augment: As in :class:`MultiTaskDataModule`
            (``augment``: e.g. ``BatchAugment(noise=0.1)`` on the standardised features).

    An empty cell is a missing label, masked out of that task's loss and metrics; a row whose every target
    is empty is an unlabelled row, which only the distillation terms reach: the teachers label it.

    YAML::

        data:
          class_path: lightning_mtkd.data.CSVMultiTaskDataModule
          init_args:
            train: data/patients.csv
            targets: {diagnosis: classification, length_of_stay: regression}
            drop: [patient_id]
    """

    def __init__(
        self,
        train: str,
        targets: dict[str, TargetKind],
        features: list[str] | None = None,
        val: str | None = None,
        test: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        drop: list[str] | None = None,
        standardize: bool = True,
        delimiter: str = ",",
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        hide_labels: dict[str, float] | None = None,
        augment: BatchAugment | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            hide_labels=hide_labels,
            augment=augment,
        )
        if not targets:
            raise ValueError("targets is empty; name at least one target column, e.g. {label: classification}.")
        for column, kind in targets.items():
            if kind not in ("classification", "regression"):
                raise ValueError(f"target {column!r}: kind {kind!r} must be 'classification' or 'regression'.")
        held_out = (0.0 if val else val_fraction) + (0.0 if test else test_fraction)
        if min(val_fraction, test_fraction) < 0 or held_out >= 1:
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and leave some rows "
                "for training (their sum < 1)."
            )
        self.files = {"train": train, "val": val, "test": test}
        self.target_kinds = dict(targets)
        self.feature_columns = list(features) if features is not None else None
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.drop = set(drop or ())
        self.standardize = standardize
        self.delimiter = delimiter
        self.classes: dict[str, list[str]] = {}
        self.num_classes: dict[str, int] = {}
        self.in_features: int | None = None

    def build_splits(self) -> dict[str, Dataset]:
        tables = {split: read_csv_columns(path, self.delimiter) for split, path in self.files.items() if path}
        features = self._resolve_features(tables)
        for column, kind in self.target_kinds.items():
            if kind == "classification":
                self.classes[column] = class_vocabulary([c for table in tables.values() for c in table[column]])
                if len(self.classes[column]) < 2:
                    raise ValueError(
                        f"target {column!r} has {len(self.classes[column])} class(es) in the data; a classification "
                        "task needs at least two (or declare it 'regression')."
                    )
            self.num_classes[column] = len(self.classes[column]) if kind == "classification" else 1
        arrays = {split: self._arrays(table, features, self.files[split] or "") for split, table in tables.items()}
        arrays = self._split_rows(arrays)
        self.in_features = len(features)
        train_x = arrays["train"][0]
        mean = train_x.mean(0) if self.standardize else torch.zeros(len(features))
        std = train_x.std(0, unbiased=False).clamp_min(1e-8) if self.standardize else torch.ones(len(features))
        return {split: MultiTaskDataset((x - mean) / std, y) for split, (x, y) in arrays.items()}

    def _resolve_features(self, tables: dict[str, dict[str, list[str]]]) -> list[str]:
        columns = list(tables["train"])
        features = self.feature_columns
        if features is None:
            features = [c for c in columns if c not in self.target_kinds and c not in self.drop]
        for split, table in tables.items():
            missing = [c for c in [*features, *self.target_kinds] if c not in table]
            if missing:
                raise KeyError(
                    f"the {split} CSV {self.files[split]!r} has no column(s) {missing}; its columns are {list(table)}."
                )
        overlap = [c for c in features if c in self.target_kinds]
        if overlap:
            raise ValueError(f"column(s) {overlap} are both features and targets; a target must not be an input.")
        if not features:
            raise ValueError(f"no feature columns left in {self.files['train']!r}; name them with `features`.")
        return features

    def _arrays(
        self, table: dict[str, list[str]], features: list[str], path: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows = len(table[features[0]])
        x = np.empty((rows, len(features)), dtype=np.float32)
        for j, column in enumerate(features):
            cells = table[column]
            holes = [i for i, cell in enumerate(cells) if _is_missing(cell)]
            if holes:
                raise ValueError(
                    f"{path!r}: feature {column!r} is missing on data row(s) {[i + 1 for i in holes[:5]]}; "
                    "impute missing features (or list the column in `drop`) before training."
                )
            where = f"{path!r}, feature {column!r}, data row"
            x[:, j] = [_as_float(cell, f"{where} {i + 1}") for i, cell in enumerate(cells)]
        if not np.isfinite(x).all():
            raise ValueError(f"{path!r}: features hold inf values; clean them before training.")
        targets: dict[str, torch.Tensor] = {}
        for column, kind in self.target_kinds.items():
            cells = table[column]
            if kind == "classification":
                index = {name: i for i, name in enumerate(self.classes[column])}
                targets[column] = torch.tensor([IGNORE_INDEX if _is_missing(c) else index[c] for c in cells])
            else:
                values = [
                    math.nan if _is_missing(c) else _as_float(c, f"{path!r}, target {column!r}, data row {i + 1}")
                    for i, c in enumerate(cells)
                ]
                targets[column] = torch.tensor(values, dtype=torch.float32).unsqueeze(1)
        return torch.from_numpy(x), targets

    def _split_rows(self, arrays: dict[str, tuple]) -> dict[str, tuple]:
        """Hold out random rows of the training file for the splits that have no file of their own."""
        wanted = [split for split in ("val", "test") if split not in arrays]
        if not wanted:
            return arrays
        x, y = arrays["train"]
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        start, result = 0, dict(arrays)
        for split in wanted:
            count = max(1, round(self.fractions[split] * len(x))) if self.fractions[split] > 0 else 0
            if count:
                rows = order[start : start + count]
                result[split] = (x[rows], {k: v[rows] for k, v in y.items()})
                start += count
        rows = order[start:]
        if len(rows) == 0:
            raise ValueError(f"{self.files['train']!r} has {len(x)} rows: none left to train on; lower the fractions.")
        result["train"] = (x[rows], {k: v[rows] for k, v in y.items()})
        return result
