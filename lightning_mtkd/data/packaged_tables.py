"""Real multi-task tables that ship inside pip packages: Palmer penguins and abalone.

Each module reads its table from an installed package (no download), turns it into numbers, splits the rows
at random from ``seed`` into train / val / test, and standardises the measured features and the
regression targets with the training rows' mean and standard deviation. After ``setup()`` a module holds
``in_features``, ``num_classes`` and ``classes`` per task (what a model's heads need), ``feature_names``,
the statistics it used (``feature_mean``/``feature_std``, ``target_mean``/``target_std``: a standardised
prediction ``z`` is ``z * target_std[task] + target_mean[task]`` in the table's units) and ``rows``, each
split's positions in the package's table.

The packages are the ``data`` extra: ``pip install 'lightning-mtkd[data]'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_mtkd.data.augment import BatchAugment
from lightning_mtkd.data.base import MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.tasks import IGNORE_INDEX


@dataclass
class Table:
    """A table in numbers, before splitting.

    Attributes:
        features: ``(N, F)`` float32 inputs, none missing.
        feature_names: The ``F`` columns' names.
        standardize: ``(F,)`` bool: which columns are standardised (measurements; not 0/1 indicators).
        targets: ``{task: labels}``: int64 ``(N,)`` class indices (``-100`` when missing) for a
            classification task, float32 ``(N, 1)`` values (``NaN`` when missing) for a regression task.
        classes: ``{task: class names in label order}`` for each classification task.
        rows: ``(N,)`` each row's position in the package's table (rows without features are left out).
    """

    features: np.ndarray
    feature_names: list[str]
    standardize: np.ndarray
    targets: dict[str, np.ndarray]
    classes: dict[str, list[str]] = field(default_factory=dict)
    rows: np.ndarray | None = None


def class_labels(values: Any, classes: list[str]) -> np.ndarray:
    """Class indices of ``values`` in ``classes``; anything not in ``classes`` (a missing value) is ``-100``.

    Example:
        >>> class_labels(["male", None, "female"], ["female", "male"]).tolist()
        [1, -100, 0]
    """
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index.get(value, IGNORE_INDEX) for value in values], dtype=np.int64)


def one_hot(values: Any, classes: list[str]) -> np.ndarray:
    """``(N, len(classes))`` float32 0/1 indicators of ``values``.

    Example:
        >>> one_hot(["b", "a"], ["a", "b", "c"]).tolist()
        [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    """
    return (np.asarray(values, dtype=object)[:, None] == np.asarray(classes, dtype=object)[None, :]).astype(np.float32)


def _missing_package(module: str, package: str) -> ImportError:
    return ImportError(
        f"{module} reads the table shipped inside the `{package}` package, which is not installed: "
        f"pip install {package} (or pip install 'lightning-mtkd[data]')."
    )


class PackagedTableDataModule(MultiTaskDataModule):
    """Base of the packaged tables: a seeded row split and train-only standardisation.

    Subclasses implement :meth:`read_table`. The rows are shuffled once by ``torch.randperm`` seeded with
    ``seed``; the first ``round(test_fraction · N)`` rows are the test split, the next
    ``round(val_fraction · N)`` the validation split, the rest the training split.

    Args:
        val_fraction, test_fraction: Shares of the rows held out for validation and test.
        standardize_targets: Scale regression targets to zero mean and unit variance on the training rows
            (their losses then weigh like the classification ones).
        batch_size, num_workers, pin_memory, seed, hide_labels, augment: As in :class:`MultiTaskDataModule`
            (for a table: ``noise`` and ``mixup``; ``shift`` needs images).
    """

    def __init__(
        self,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        standardize_targets: bool = True,
        batch_size: int = 64,
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
        if min(val_fraction, test_fraction) <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be > 0 and leave rows to train "
                "on (their sum < 1)."
            )
        self.fractions = {"test": test_fraction, "val": val_fraction}
        self.standardize_targets = standardize_targets
        self.in_features: int | None = None
        self.feature_names: list[str] = []
        self.classes: dict[str, list[str]] = {}
        self.num_classes: dict[str, int] = {}
        self.rows: dict[str, Tensor] = {}
        self.feature_mean: Tensor | None = None
        self.feature_std: Tensor | None = None
        self.target_mean: dict[str, float] = {}
        self.target_std: dict[str, float] = {}

    def read_table(self) -> Table:
        """The package's table in numbers; subclasses implement it."""
        raise NotImplementedError("a packaged table module implements read_table()")

    def build_splits(self) -> dict[str, Dataset]:
        table = self.read_table()
        x = torch.from_numpy(table.features)
        targets = {name: torch.from_numpy(values) for name, values in table.targets.items()}
        source_rows = torch.from_numpy(table.rows if table.rows is not None else np.arange(len(x)))
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        counts = {split: round(fraction * len(x)) for split, fraction in self.fractions.items()}
        if min(counts.values()) < 1 or len(x) - sum(counts.values()) < 1:
            raise ValueError(f"{len(x)} rows cannot fill train / val / test with fractions {self.fractions}.")
        positions = {
            "test": order[: counts["test"]],
            "val": order[counts["test"] : counts["test"] + counts["val"]],
            "train": order[counts["test"] + counts["val"] :],
        }
        train = positions["train"]
        scaled = torch.from_numpy(table.standardize)
        mean = torch.where(scaled, x[train].mean(0), torch.zeros(()))
        std = torch.where(scaled, x[train].std(0, unbiased=False).clamp_min(1e-8), torch.ones(()))
        for name, values in targets.items():
            if values.is_floating_point() and self.standardize_targets:
                present = values[train][~values[train].isnan()]
                self.target_mean[name] = present.mean().item()
                self.target_std[name] = max(present.std(unbiased=False).item(), 1e-8)
                targets[name] = (values - self.target_mean[name]) / self.target_std[name]
        self.feature_mean, self.feature_std = mean, std
        self.in_features, self.feature_names = x.shape[1], list(table.feature_names)
        self.classes = dict(table.classes)
        self.num_classes = {
            name: len(table.classes.get(name, ())) or values.shape[-1] for name, values in targets.items()
        }
        self.rows = {split: source_rows[rows] for split, rows in positions.items()}
        return {
            split: MultiTaskDataset((x[rows] - mean) / std, {name: values[rows] for name, values in targets.items()})
            for split, rows in positions.items()
        }


class PenguinsDataModule(PackagedTableDataModule):
    """Palmer penguins: species, sex and body mass of 342 penguins from their bills, flippers and island.

    Data: the ``palmerpenguins`` package (``load_penguins()``, its bundled ``penguins.csv``), from Horst,
    Hill & Gorman (2020), *palmerpenguins: Palmer Archipelago (Antarctica) penguin data*, R package,
    doi:10.5281/zenodo.3960218; measured by Gorman, Williams & Fraser (2014), PLoS ONE 9(3): e90081, at
    Palmer Station LTER. 344 penguins; the 2 with no measurements are left out (342 rows).

    Inputs (6): ``bill_length_mm``, ``bill_depth_mm``, ``flipper_length_mm`` (standardised on the training
    rows) and the island one-hot (``island_Biscoe``, ``island_Dream``, ``island_Torgersen``, 0/1).
    Tasks: ``species`` (3 classes: Adelie, Chinstrap, Gentoo), ``sex`` (2 classes: female, male; the 9
    unsexed birds among the 342 have the missing label ``-100``) and ``body_mass`` (regression, grams,
    standardised on the training rows; ``target_mean``/``target_std`` convert back). None of them is a
    function of the inputs: species is nearly separable by bill shape and island, sex needs species and
    size together, and body mass is predicted from the other measurements only up to individual spread.
    The ``year`` column is not used. Splits: 20 % test, 20 % val, 60 % train (68 / 68 / 206 rows), seeded.

    Example:
        >>> dm = PenguinsDataModule(batch_size=8)
        >>> dm.setup()
        >>> batch = next(iter(dm.train_dataloader()))
        >>> tuple(batch["input"].shape), dm.num_classes
        ((8, 6), {'species': 3, 'sex': 2, 'body_mass': 1})
    """

    MEASUREMENTS = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
    ISLANDS = ["Biscoe", "Dream", "Torgersen"]
    SPECIES = ["Adelie", "Chinstrap", "Gentoo"]
    SEXES = ["female", "male"]

    def __init__(
        self,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        standardize_targets: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        hide_labels: dict[str, float] | None = None,
        augment: BatchAugment | None = None,
    ) -> None:
        super().__init__(
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            standardize_targets=standardize_targets,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            hide_labels=hide_labels,
            augment=augment,
        )

    def read_table(self) -> Table:
        try:
            from palmerpenguins import load_penguins
        except ImportError as error:
            raise _missing_package(type(self).__name__, "palmerpenguins") from error
        frame = load_penguins()
        keep = frame[list(self.MEASUREMENTS)].notna().all(axis=1).to_numpy()
        frame = frame[keep]
        measured = frame[list(self.MEASUREMENTS)].to_numpy(dtype=np.float32)
        features = np.concatenate([measured, one_hot(frame["island"], self.ISLANDS)], axis=1)
        return Table(
            features=features,
            feature_names=[*self.MEASUREMENTS, *(f"island_{island}" for island in self.ISLANDS)],
            standardize=np.array([True] * len(self.MEASUREMENTS) + [False] * len(self.ISLANDS)),
            targets={
                "species": class_labels(frame["species"], self.SPECIES),
                "sex": class_labels(frame["sex"], self.SEXES),
                "body_mass": frame["body_mass_g"].to_numpy(dtype=np.float32, na_value=np.nan)[:, None],
            },
            classes={"species": self.SPECIES, "sex": self.SEXES},
            rows=np.flatnonzero(keep),
        )


class AbaloneDataModule(PackagedTableDataModule):
    """Abalone: sex and ring count (age) of 4,177 abalone from their size and weights.

    Data: scikit-lego's ``sklego.datasets.load_abalone`` (its bundled ``abalone.zip``), the UCI *Abalone*
    set (Nash, Sellers, Talbot, Cawthorn & Ford 1994, *The Population Biology of Abalone (Haliotis species)
    in Tasmania*, Sea Fisheries Division Technical Report 48; UCI Machine Learning Repository,
    doi:10.24432/C55C7W). 4,177 rows, none missing.

    Inputs (7, standardised on the training rows): ``length``, ``diameter``, ``height``, ``whole_weight``,
    ``shucked_weight``, ``viscera_weight``, ``shell_weight``, as UCI gives them (mm and grams divided by 200).
    Tasks: ``sex`` (3 classes: F, I = infant, M; adults' sex is barely visible in size, so this task stays
    hard) and ``rings`` (regression, ring count, +1.5 gives the age in years; standardised on the training
    rows, ``target_mean``/``target_std`` convert back). Splits: 15 % test, 15 % val, 70 % train
    (627 / 627 / 2,923 rows), seeded.

    Example:
        >>> dm = AbaloneDataModule(batch_size=8)
        >>> dm.setup()
        >>> tuple(next(iter(dm.train_dataloader()))["input"].shape), dm.classes["sex"]
        ((8, 7), ['F', 'I', 'M'])
    """

    MEASUREMENTS = (
        "length",
        "diameter",
        "height",
        "whole_weight",
        "shucked_weight",
        "viscera_weight",
        "shell_weight",
    )
    SEXES = ["F", "I", "M"]

    def read_table(self) -> Table:
        try:
            from sklego.datasets import load_abalone
        except ImportError as error:
            raise _missing_package(type(self).__name__, "scikit-lego") from error
        frame = load_abalone(as_frame=True)
        return Table(
            features=frame[list(self.MEASUREMENTS)].to_numpy(dtype=np.float32),
            feature_names=list(self.MEASUREMENTS),
            standardize=np.ones(len(self.MEASUREMENTS), dtype=bool),
            targets={
                "sex": class_labels(frame["sex"], self.SEXES),
                "rings": frame["rings"].to_numpy(dtype=np.float32)[:, None],
            },
            classes={"sex": self.SEXES},
        )
