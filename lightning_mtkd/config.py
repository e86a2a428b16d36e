"""Turning objects into the config dicts LightningCLI reads, and back.

Checkpoints must hold only plain data (PyTorch loads them with ``weights_only=True``), yet a
module trained from Python should reload like one trained from YAML. So the hyper-parameters
of our LightningModules are always stored the way LightningCLI stores them: jsonargparse
config dicts (``class_path``/``init_args``) plus Lightning's ``_instantiator`` key, which makes
``load_from_checkpoint`` rebuild nested models through jsonargparse.

Our own ``nn.Module`` classes derive from :class:`RecordsInitArgs`, which remembers their
constructor arguments so they can be written as such a dict.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from torch import nn

#: Lightning's allow-listed instantiator for checkpoints written by LightningCLI.
LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def class_path(obj: type | Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class RecordsInitArgs:
    """Mixin for modules whose constructor arguments are recorded for checkpoints and configs.

    The most-derived class's bound ``__init__`` arguments are kept in ``init_config``.
    """

    init_config: dict[str, Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Any, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            # Only the outermost constructor (the first in the MRO that defines one) describes the object.
            outermost = next(klass for klass in type(self).__mro__ if "__init__" in klass.__dict__)
            if outermost is cls:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(list(bound.arguments.items())[1:])
                object.__setattr__(self, "init_config", {"class_path": class_path(self), "init_args": arguments})

        cls.__init__ = recording_init  # type: ignore[misc]


def to_config(value: Any) -> Any:
    """Plain-data (YAML-able) form of a constructor argument; ``None`` for a module we cannot describe."""
    if isinstance(value, nn.Module):
        spec = getattr(value, "init_config", None)
        if spec is None:
            return None
        return {"class_path": spec["class_path"], "init_args": to_config(spec["init_args"])}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_config(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, functools.partial):
        return {"class_path": class_path(value.func), "init_args": to_config(value.keywords)}
    if isinstance(value, type):
        return {"class_path": class_path(value)}
    if isinstance(value, dict):
        return {str(k): to_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_config(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None


def hparams_from_locals(module: Any, local_vars: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of ``module`` as a LightningCLI-style config from its ``__init__`` locals."""
    names = list(inspect.signature(type(module).__init__).parameters)[1:]
    config = {name: to_config(local_vars[name]) for name in names if name in local_vars}
    return {"_instantiator": LIGHTNING_INSTANTIATOR, "_class_path": class_path(module), **config}


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Instantiate an ``nn.Module`` (and the modules nested in it) from a ``class_path`` config."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--module", type=nn.Module)
    config = parser.parse_object({"module": spec})
    return parser.instantiate_classes(config).module
