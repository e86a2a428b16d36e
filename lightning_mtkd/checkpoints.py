"""Hyper-parameters and checkpoints: what a lightning-mtkd module records, and how it is read back.

- :func:`save_init_arguments`: a module's constructor arguments, collected once (in the base class)
  across every ``__init__`` of its class chain, stored as plain config dicts (``lightning_mtkd.config``);
  under LightningCLI, the parsed config itself.
- :func:`load_module` / :func:`load_teacher`: a checkpoint loaded through the class that wrote it.
- :func:`check_checkpoint_class` and :func:`upgrade_state_dict`: resuming into the wrong strategy is
  refused; state dicts written by earlier versions are renamed to the current layout.
"""

from __future__ import annotations

import importlib
import inspect
import os
import types
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import nn

from lightning_mtkd.config import class_path, to_config

if TYPE_CHECKING:
    from lightning_mtkd.strategies.base import MultiTaskModule

#: Where a checkpoint records the class that wrote it (also in ``hyper_parameters["_class_path"]`` under the CLI).
CLASS_KEY = "lightning_mtkd_class"


def given_by_cli() -> dict[str, Any] | None:
    """The config LightningCLI is instantiating this module from, if any.

    Lightning offers no public accessor: this reads the context variable its CLI sets around the
    constructor (``lightning.pytorch.core.mixins.hparams_mixin``), the one thing ``save_hyperparameters``
    itself consults.
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get()


def exposed_parameters(cls: type) -> list[str]:
    """The constructor arguments a class takes: its own, plus its parent's when it passes ``**kwargs`` on
    (less those it sets itself, named in its ``fixed_parameters``: an EMA teacher is made, not given)."""
    fixed = set(getattr(cls, "fixed_parameters", ()))
    names: list[str] = list(fixed)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]
        names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return [name for name in names if name not in fixed]


def save_init_arguments(module: MultiTaskModule, frame: types.FrameType | None) -> None:
    """Save the constructor arguments of ``module``'s whole class chain once, as plain config dicts.

    Called from the base class's ``__init__`` with its frame: Lightning's ``collect_init_args`` walks up
    the chain of ``__init__`` frames (the strategy's, a user's subclass's), so a subclass only names its
    own arguments and passes the rest on. Teachers are recorded by :meth:`Teachers.config` rules (a path
    is kept, a module's weights never are).
    """
    if given_by_cli() is not None:
        module.save_hyperparameters()
        return
    assert frame is not None
    levels = collect_init_args(frame, [], classes=(L.LightningModule,))
    exposed = exposed_parameters(type(module))
    arguments: dict[str, Any] = {}
    for level in levels:  # base first, the most derived class last: the caller's own values win
        arguments.update({name: value for name, value in level.items() if name in exposed})
    config = {name: _recorded(name, arguments[name]) for name in exposed if name in arguments}
    module.save_hyperparameters(config)


def _recorded(name: str, value: Any) -> Any:
    if name == "teacher":
        from lightning_mtkd.teachers import UNSAVED_TEACHER

        if isinstance(value, dict):
            return {k: v if isinstance(v, str) else UNSAVED_TEACHER for k, v in value.items()}
        return value if isinstance(value, str) else UNSAVED_TEACHER
    return to_config(value)


def as_module(value: Any, role: str) -> nn.Module:
    """A network argument as given, or rebuilt from the config a checkpoint recorded for it."""
    from lightning_mtkd.config import build_module

    if isinstance(value, nn.Module):
        return value
    if isinstance(value, dict) and "class_path" in value:
        return build_module(value, role)
    raise ValueError(
        f"{role}: this checkpoint does not record how to build the {role} (a class defined in a script or a "
        f"function cannot be imported again). Pass it explicitly, e.g. `load_from_checkpoint(path, {role}=my_model)`."
    )


# ---------------------------------------------------------------------------------- loading
def recorded_class(checkpoint: dict[str, Any]) -> str | None:
    return checkpoint.get(CLASS_KEY) or checkpoint.get("hyper_parameters", {}).get("_class_path")


def load_module(path: str, role: str = "checkpoint", network: nn.Module | None = None) -> MultiTaskModule:
    """The lightning-mtkd module saved at ``path`` (its own class, hyper-parameters and weights; no teacher loaded).

    Loads through the class recorded in the checkpoint: Lightning filters hyper-parameters by the
    signature of the class it is called on, so ``MultiTaskModule.load_from_checkpoint`` would drop a
    strategy's own arguments. ``network``: the trained network's architecture, built by the caller, for a
    checkpoint that could not record how to rebuild it (its weights still come from the checkpoint).
    """
    from lightning_mtkd.strategies.base import MultiTaskModule

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{role}: checkpoint {path!r} does not exist. Train it first (e.g. "
            "`lightning-mtkd fit --config configs/multimnist/teacher.yaml`) or fix the path."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    recorded = recorded_class(checkpoint)
    if "state_dict" not in checkpoint or recorded is None:
        raise ValueError(
            f"{role}: {path!r} is not a lightning-mtkd checkpoint (no state_dict or module class); give a "
            "checkpoint written by MultiTaskModule or a distillation strategy, or pass the network as a module."
        )
    cls = _import_class(recorded)
    if not (isinstance(cls, type) and issubclass(cls, MultiTaskModule)):
        raise ValueError(f"{role}: {path!r} records class {recorded!r}, which is not a lightning-mtkd module.")
    overrides: dict[str, Any] = {}
    if network is not None:  # under the name this class takes its network by
        overrides["student" if "student" in exposed_parameters(cls) else "model"] = network
    try:
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)
    except ValueError as error:  # a network whose constructor arguments were not recorded: say which and how
        raise ValueError(f"{role}: cannot rebuild the network saved in {path!r}: {error}") from None


def load_teacher(path: str, name: str = "teacher") -> nn.Module:
    """The network inside a ``MultiTaskModule`` (or distilled student) checkpoint, to be frozen for teaching."""
    try:
        return load_module(path, role=f"teacher {name!r}").model
    except ValueError as error:
        if "cannot rebuild" not in str(error):
            raise
        raise ValueError(
            f"{error} For a teacher, load it yourself and pass the network: "
            f"`teacher=load_module({path!r}, network=MyNet(...)).model` (lightning_mtkd.load_module)."
        ) from None


def _import_class(path: str) -> Any:
    module_path, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_path), name, None)
    except ImportError:
        return None


def check_checkpoint_class(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written by another class (a teacher's into a strategy, one strategy's into
    another); a user's subclass of the recorded class is fine."""
    written_by = recorded_class(checkpoint)
    if written_by and not _is_subclass_of(type(module), written_by):
        raise ValueError(
            f"this checkpoint was written by {written_by}, but it is being loaded into {class_path(module)}. Load it "
            f"with the class that wrote it (`{written_by.rsplit('.', 1)[-1]}.load_from_checkpoint`, or the config "
            "it was trained with), or start a new fit without `ckpt_path`."
        )


def _is_subclass_of(cls: type, path: str) -> bool:
    from lightning_mtkd.strategies.base import MultiTaskModule
    from lightning_mtkd.strategies.distillation import DistillationModule

    recorded = _import_class(path)
    if recorded in (MultiTaskModule, DistillationModule):
        return cls is recorded
    return isinstance(recorded, type) and issubclass(cls, recorded)


def upgrade_state_dict(checkpoint: dict[str, Any]) -> None:
    """Bring a state dict written by lightning-mtkd 0.1 before the base redesign to the current layout, in place.

    Fusion's learned gates (``gates.<task>.*``) now live with the strategy's other dry-run-sized modules
    (``extras.<task>.*``), which record each entry's class.
    """
    state = checkpoint.get("state_dict")
    if not state or not any(key.startswith("gates.") for key in state):
        return
    gates = {key.split(".")[1] for key in state if key.startswith("gates.")}
    for key in [key for key in state if key.startswith("gates.")]:
        state["extras." + key[len("gates.") :]] = state.pop(key)
    state["extras._extra_state"] = dict.fromkeys(sorted(gates), "lightning_mtkd.models.deferred.FusionGate")
