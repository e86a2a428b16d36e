"""Turning objects into the config dicts LightningCLI reads, and back.

Checkpoints must hold only plain data (PyTorch loads them with ``weights_only=True``), yet a
module trained from Python should reload like one trained from YAML. So the hyper-parameters
of our LightningModules are stored the way LightningCLI stores them: ``class_path``/``init_args``
dicts, which the constructors turn back into objects (:func:`build_module`, :func:`build_callable`).

How a network's constructor arguments are found (:func:`to_config`):

1. our own classes derive from :class:`RecordsInitArgs`, which records them as they are called;
2. any other importable class (a user's ``nn.Module``, a Hugging Face model) is described from its
   attributes: each ``__init__`` parameter must be stored on the object under its own name (or with
   a leading underscore), as scikit-learn estimators do; a Hugging Face ``config`` is recorded whole.
   The description is then checked by rebuilding the class on the ``meta`` device (no memory, no
   weights) and comparing every parameter's and buffer's name and shape; anything it cannot prove
   is recorded as the class alone, with the arguments it could not find, so that reloading says
   exactly what to pass instead of building a different network.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: Constructor parameters that place a module rather than shape it (``nn.Linear(..., device, dtype)``).
PLACEMENT_PARAMETERS = ("device", "dtype")


def class_path(obj: type | Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class RecordsInitArgs:
    """Mixin for modules whose constructor arguments are recorded for checkpoints and configs.

    The most-derived class's bound ``__init__`` arguments are kept in ``init_config``. Derive your
    own networks from it when their constructor arguments are not stored as attributes.
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

        cls.__init__ = recording_init  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------- objects → config
def to_config(value: Any) -> Any:
    """Plain-data (YAML-able) form of a constructor argument; ``None`` for an object we cannot describe.

    A network whose arguments cannot all be found is recorded as ``{"class_path": ..., "uncaptured":
    [names]}`` (see :func:`describe_module`), which :func:`build_module` refuses with a clear message.
    """
    if isinstance(value, nn.Module):
        return describe_module(value)
    if _is_hf_config(value):
        arguments = value.to_diff_dict()
        implementation = getattr(value, "_attn_implementation", None)
        if implementation:  # not part of to_dict(), yet it decides whether attention weights exist
            arguments["attn_implementation"] = implementation
        return {"class_path": class_path(value), "init_args": to_config(arguments)}
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


def describe_module(module: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` that rebuild ``module``'s architecture, as far as it can be proven.

    Returns ``None`` for a class that cannot be imported again (defined in ``__main__`` or in a function),
    and ``{"class_path", "uncaptured": [...]}`` when some constructor arguments could not be found or the
    rebuilt module would differ.
    """
    recorded = getattr(module, "init_config", None)
    if recorded is not None:
        return {"class_path": recorded["class_path"], "init_args": to_config(recorded["init_args"])}
    cls = type(module)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    arguments, uncaptured = _arguments_from_attributes(module)
    if not uncaptured and not _rebuilds_alike(module, cls, arguments):
        uncaptured = ["(the rebuilt module's parameters differ: arguments not stored under their own names)"]
    if uncaptured:
        return {"class_path": class_path(cls), "uncaptured": uncaptured}
    return {"class_path": class_path(cls), "init_args": arguments}


def _arguments_from_attributes(module: nn.Module) -> tuple[dict[str, Any], list[str]]:
    try:
        parameters = list(inspect.signature(type(module).__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}, ["(constructor signature unreadable)"]
    arguments: dict[str, Any] = {}
    uncaptured: list[str] = []
    for parameter in parameters:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if parameter.name in PLACEMENT_PARAMETERS:
            continue
        found = _attribute(module, parameter.name)
        config = to_config(found) if found is not _MISSING else _MISSING
        if config is _MISSING or (found is not None and config is None) or _is_uncaptured(config):
            uncaptured.append(parameter.name)
        else:
            arguments[parameter.name] = config
    return arguments, uncaptured


_MISSING = object()


def _attribute(module: nn.Module, name: str) -> Any:
    for attribute in (name, f"_{name}"):
        try:
            value = getattr(module, attribute)
        except AttributeError:
            continue
        # A parameter or buffer under the argument's name (nn.Linear's `bias`) is not the argument itself.
        return _MISSING if isinstance(value, torch.Tensor) else value
    return _MISSING


def _is_uncaptured(config: Any) -> bool:
    if isinstance(config, dict):
        return "uncaptured" in config or any(_is_uncaptured(v) for v in config.values())
    if isinstance(config, list):
        return any(_is_uncaptured(v) for v in config)
    return False


def _rebuilds_alike(module: nn.Module, cls: type, arguments: dict[str, Any]) -> bool:
    """Build ``cls(**arguments)`` on the meta device and compare every tensor's name and shape."""
    try:
        with torch.device("meta"):
            rebuilt = cls(**{name: _build(value, name) for name, value in arguments.items()})
    except Exception:  # noqa: BLE001 - any failure means the description does not rebuild the module
        return False
    return _shapes(rebuilt) == _shapes(module)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items() if isinstance(value, torch.Tensor)}


def _is_hf_config(value: Any) -> bool:
    transformers = sys.modules.get("transformers")
    config_class = getattr(transformers, "PretrainedConfig", None) if transformers is not None else None
    return config_class is not None and isinstance(value, config_class)


# ---------------------------------------------------------------------------------- config → objects
def build_module(spec: dict[str, Any], role: str = "model") -> nn.Module:
    """Instantiate an ``nn.Module`` (and the modules nested in it) from a ``class_path`` config."""
    module = _build(spec, role)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{role}: {spec.get('class_path')!r} built a {type(module).__name__}, not an nn.Module.")
    return module


def build_callable(spec: Any, role: str = "optimizer") -> Callable[..., Any]:
    """A factory from its config (``{"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}}``), or as given."""
    if isinstance(spec, dict) and "class_path" in spec:
        target = _import(spec["class_path"], role)
        return functools.partial(target, **_build(spec.get("init_args", {}), role))
    if not callable(spec):
        raise TypeError(f"{role}: expected a callable or a class_path config, got {spec!r}.")
    return spec


def _build(value: Any, role: str) -> Any:
    if isinstance(value, dict) and "class_path" in value:
        if "uncaptured" in value:
            raise ValueError(
                f"{role}: the checkpoint records the class {value['class_path']} but not its constructor argument(s) "
                f"{value['uncaptured']} (they are not stored on the object under their own names), so it cannot "
                f"rebuild it. Pass the network yourself: `load_from_checkpoint(path, {role}=<your network>)`, or "
                "`lightning-mtkd export --model.class_path=... --model.init_args...`; or store each argument as an "
                "attribute of the same name, or derive the class from lightning_mtkd.config.RecordsInitArgs."
            )
        target = _import(value["class_path"], role)
        arguments = {name: _build(argument, f"{role}.{name}") for name, argument in value.get("init_args", {}).items()}
        from_dict = getattr(target, "from_dict", None)
        if _is_hf_config_class(target) and callable(from_dict):
            return from_dict(arguments)
        return target(**arguments)
    if isinstance(value, dict):
        return {key: _build(item, role) for key, item in value.items()}
    if isinstance(value, list):
        return [_build(item, role) for item in value]
    return value


def _is_hf_config_class(target: Any) -> bool:
    transformers = sys.modules.get("transformers")
    config_class = getattr(transformers, "PretrainedConfig", None) if transformers is not None else None
    return config_class is not None and isinstance(target, type) and issubclass(target, config_class)


def _import(path: str, role: str) -> Any:
    module_path, _, name = path.rpartition(".")
    try:
        target: Any = importlib.import_module(module_path)
    except ImportError as error:
        raise ImportError(
            f"{role}: cannot import {module_path!r} for {path!r} ({error}). Install or put on PYTHONPATH the package "
            f"that defines it, or pass the object itself (`{role.split('.')[0]}=...`)."
        ) from None
    for part in name.split("."):  # nested classes: qualnames
        target = getattr(target, part, None)
        if target is None:
            raise ImportError(f"{role}: {module_path!r} has no {name!r} (from {path!r}).")
    return target
