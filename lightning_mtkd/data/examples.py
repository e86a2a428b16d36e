"""Two example inputs for a module's dry run (adaptor sizing, finding the shared feature), from wherever the data is.

Adaptors and gates must exist before the optimizer is built, which Lightning does right after the
module's ``setup`` and before the first batch, so the dry run needs inputs before any loop runs:
``module.example_input_array`` if set, else the first two samples of the stage's data, whether it
comes from a ``LightningDataModule`` or from loaders passed straight to ``trainer.fit(module, loader)``.
Samples are read from the loader's data set by index, so no sampler advances and no worker starts.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, IterableDataset

from lightning_mtkd.data.base import fetch_samples, merge_task_batches
from lightning_mtkd.inputs import first_samples, tensor_leaves, to_device

if TYPE_CHECKING:
    import lightning as L

_STAGE_HOOK = {"fit": "train_dataloader", "validate": "val_dataloader", "test": "test_dataloader"}


def example_inputs(module: L.LightningModule, stage: str, count: int = 2) -> Any:
    """``count`` example inputs on the module's device, or an error that says how to provide them."""
    example = module.example_input_array
    if example is None or not tensor_leaves(example):
        loader = stage_dataloader(module, stage)
        if loader is None:
            raise RuntimeError(
                "the strategy sizes its adaptors (or finds its feature paths) from a dry run on example inputs, but "
                "no data was found: pass loaders to trainer.fit/validate/test or a LightningDataModule, or set "
                "`module.example_input_array` to a batch of inputs first."
            )
        with rng_preserved():  # reading samples must not shift the run's random draws
            batch = merge_task_batches(first_batch(loader, count), getattr(module, "tasks", None))
        example = batch["input"] if isinstance(batch, Mapping) and "input" in batch else batch
    return to_device(first_samples(example, count), module.device)


def training_set_size(module: L.LightningModule) -> int:
    """The number of training samples (the rows of a memory bank keyed by ``batch["index"]``)."""
    loader = stage_dataloader(module, "fit")
    loaders = loader.iterables if isinstance(loader, CombinedLoader) else loader
    loaders = list(loaders.values()) if isinstance(loaders, Mapping) else loaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    sizes = [len(getattr(one, "dataset", ())) for one in loaders]  # type: ignore[arg-type]
    if not all(sizes):
        raise RuntimeError(
            "a memory bank keyed by batch['index'] needs the training set's size: train from a DataModule or from "
            "DataLoaders over map-style data sets."
        )
    return sum(sizes)


def stage_dataloader(module: L.LightningModule, stage: str) -> Any:
    """The loader(s) of ``stage``: from the trainer's DataModule, else those given to the trainer call."""
    trainer = module._trainer
    if trainer is None:
        return None
    hook = _STAGE_HOOK.get(stage, "train_dataloader")
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        return getattr(datamodule, hook)()
    # Loaders passed to trainer.fit(module, train_loader, ...): Lightning keeps them on its loops and has no
    # public accessor before the loop starts, which is after the optimizer is built.
    loop = {"fit": trainer.fit_loop, "validate": trainer.validate_loop, "test": trainer.test_loop}.get(
        stage, trainer.fit_loop
    )
    source = getattr(loop, "_data_source", None)
    if source is None or source.instance is None or not source.is_defined():
        return None
    return source.dataloader()


def first_batch(loader: Any, count: int) -> Any:
    """The first ``count`` samples of a DataLoader (by index), a CombinedLoader, or a list/dict of loaders."""
    if isinstance(loader, CombinedLoader):
        loaders = loader.iterables
        if isinstance(loaders, Mapping):  # one data set per task: a {source: batch} dict, merged by the caller
            return {name: first_batch(inner, count) for name, inner in loaders.items()}
        loader = loaders
    if isinstance(loader, (list, tuple)):
        return first_batch(loader[0], count)
    if isinstance(loader, Mapping):
        return first_batch(next(iter(loader.values())), count)
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        size = len(loader.dataset)  # type: ignore[arg-type]
        return fetch_samples(loader.dataset, list(range(min(count, size))), loader.collate_fn)
    return next(iter(loader))


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Restore the global torch, NumPy and Python random states on exit."""
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
