"""Config files, command-line overrides and the dict form of nested frozen dataclasses (``train/config.py`` uses them).

- ``parse_arg``: the ``seq=64,smoke`` after the colon of ``configs/mqar.py:seq=64,smoke`` as typed values (big_vision's
  ``parse_arg`` in ``big_vision/configs/common.py``); ``load_config_file``: a file's ``get_config(arg)``.
- ``opt`` / ``check_fields``: a field's default and bounds in one place (``warmup_steps: int = opt(100, min=0)``),
  checked by ``lcjax.checks`` from ``__post_init__``, so an option is one line.
- ``to_dict`` / ``from_dict``: plain dicts and lists (JSON) and back, every nested section rebuilt from its
  annotation; an unknown or missing key raises ``ValueError`` naming its dotted path.
- ``override``: ``--config.a.b=value`` is a key of the dict form (a misspelt key is named), the text taking the type of
  the value it replaces; the config's own ``from_dict`` then rebuilds and re-checks everything.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import os
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from lcjax.checks import require, require_bool, require_choice, require_float, require_int, require_str


# ---- config files ----------------------------------------------------------------------------------------------
def parse_arg(arg: str | None, *, lazy: bool = False, **spec: Any) -> ml_collections.ConfigDict:
    """``"seq=64,pairs=8,smoke"`` -> ``ConfigDict(seq=64, pairs=8, smoke=True, <the other spec defaults>)``.

    ``spec`` gives every allowed key with its default, whose type the value takes (a bare key is ``True``). Unknown
    keys raise ``ValueError``; ``lazy=True`` keeps them as strings instead.
    """
    out = dict(spec)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, eq, text = (s.strip() for s in item.partition("="))
        if key not in spec:
            require(lazy, f"config arg: unknown key {key!r} in {arg!r}; allowed: {sorted(spec)}")
            out[key] = text if eq else True
        elif eq:
            out[key] = _convert(spec[key], text, f"config arg: {key}")
        else:
            require(isinstance(spec[key], bool), f"config arg: {key!r} needs a value ({key}=...); only bool keys "
                                                 "may stand alone")  # fmt: skip
            out[key] = True
    return ml_collections.ConfigDict(out)


def load_config_file(path: str | os.PathLike, arg: str | None = None) -> Any:
    """``get_config(arg)`` of the Python file at ``path`` (how ``configs/default.py`` reuses ``configs/mqar.py``)."""
    path = os.fspath(path)
    require(os.path.isfile(path), f"config file {path!r} does not exist")
    name = "lcjax_config_" + os.path.basename(path).removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # registered: its dataclasses resolve
    spec.loader.exec_module(module)
    require(hasattr(module, "get_config"), f"config file {path!r} defines no get_config(arg)")
    return module.get_config(arg) if arg is not None else module.get_config()


def _convert(old: Any, text: str, where: str) -> Any:
    """``text`` as the type of the value it replaces (bool: true/false/yes/no/1/0; ``none`` is None); where that value
    is None, a list or a dict, as a Python literal (``2``, ``('attention', 'm2')``), or else the text itself."""
    if text.lower() == "none":
        return None
    try:
        if isinstance(old, bool):
            return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[text.lower()]
        if isinstance(old, (int, float, str)):
            return type(old)(text)
    except (KeyError, ValueError):
        raise ValueError(f"{where}={text!r} is not a valid {type(old).__name__}") from None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def override(cfg: Any, values: Mapping[str, Any], *, from_text: bool = False) -> Any:
    """``cfg`` with ``values`` (``{"optim.learning_rate": 1e-3, "model.mixers.mamba2.d_state": 64}``) replaced.

    Keys are dotted paths into ``cfg.to_dict()``; one that is not there raises ``ValueError`` naming it. With
    ``from_text`` the values are command-line strings. The result is ``type(cfg).from_dict`` of the new dict.
    """
    d = cfg.to_dict()
    for path, value in values.items():
        node, keys = d, path.split(".")
        for i, key in enumerate(keys):
            if not (isinstance(node, dict) and key in node):
                where = ".".join(["config", *keys[:i]])
                known = f"allowed keys of {where}: {sorted(node)}" if isinstance(node, dict) else f"{where} is a value"
                raise ValueError(f"unknown config key {'.'.join(['config', *keys[: i + 1]])!r}; {known}")
            if i + 1 < len(keys):
                node = node[key]
        node[keys[-1]] = _convert(node[keys[-1]], value, f"config.{path}") if from_text else value
    return type(cfg).from_dict(d)


# ---- field bounds ----------------------------------------------------------------------------------------------
def opt(default: Any = dataclasses.MISSING, **bounds: Any) -> Any:
    """A dataclass field with its default and the bounds ``check_fields`` applies (``min=``, ``max=``, ``choices=``)."""
    return dataclasses.field(default=default, metadata=bounds)


_hints = functools.cache(typing.get_type_hints)
_CHECKS = {bool: require_bool, int: require_int, float: require_float, str: require_str}


def _options(hint: Any) -> tuple[Any, ...]:
    """The members of ``X | Y`` (``(X,)`` for a plain annotation)."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if union else (hint,)


def check_fields(obj: Any, where: str) -> None:
    """Each field of ``obj`` by ``_check``, from its ``__post_init__``; normalised values are stored (``z_loss=0``
    becomes ``0.0``, so the dict form keeps the field's type)."""
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, _check(f, _hints(type(obj))[f.name], getattr(obj, f.name), f"{where}.{f.name}"))


def _check(f: dataclasses.Field, hint: Any, value: Any, name: str) -> Any:
    """``value`` against the field's annotation: bool/int/float/str by ``lcjax.checks`` with the field's ``opt``
    bounds (an int given for a float becomes a float), dataclass sections by type; ``None`` where it is allowed."""
    options = _options(hint)
    if value is None and type(None) in options:
        return value
    if "choices" in f.metadata:
        return require_choice(name, value, f.metadata["choices"])
    if options[0] in _CHECKS:
        return _CHECKS[options[0]](name, value, **f.metadata)
    if all(dataclasses.is_dataclass(o) for o in options) and not isinstance(value, options):
        raise TypeError(f"{name} must be a {' | '.join(o.__name__ for o in options)}, got {value!r}")
    return value


# ---- dict form -------------------------------------------------------------------------------------------------
def section(value: Any, where: str) -> Mapping[str, Any]:
    require(isinstance(value, Mapping), f"{where} must be a section (dict), got {value!r}")
    return value


def from_dict(cls: type, d: Any, where: str) -> Any:
    """``cls(**d)`` with nested dataclass sections rebuilt from their annotations, lists as tuples and every field
    checked by ``_check`` before ``cls`` is called. Any error (``TypeError`` too: this is parsing) is a
    ``ValueError`` naming ``where`` or ``where.key``."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in section(d, where):
        require(key in fields, f"{where}.{key}: unknown key; allowed keys of {where}: {sorted(fields)}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        require(name in d or not required, f"{where}.{name}: is required")
    try:
        kw = {}
        for key, value in d.items():
            hint = _hints(cls)[key]
            sections = [o for o in _options(hint) if dataclasses.is_dataclass(o)]
            if len(sections) == 1 and isinstance(value, Mapping):
                value = from_dict(sections[0], value, f"{where}.{key}")
            kw[key] = _check(fields[key], hint, tuple(value) if isinstance(value, list) else value, f"{where}.{key}")
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def to_dict(x: Any) -> Any:
    """``x`` as dicts, lists and scalars. A field left at ``None`` that ``__post_init__`` derives (``LMConfig.head_dim``
    from ``d_model // n_heads``) is written as ``None``, so an override of what it derives from derives it again."""
    if dataclasses.is_dataclass(x):
        out = {}
        for f in (f for f in dataclasses.fields(x) if f.init):
            value = getattr(x, f.name)
            derived = f.default is None and value is not None and _derived(x, f.name) == value
            out[f.name] = None if derived else to_dict(value)
        return out
    if isinstance(x, Mapping):
        return {k: to_dict(v) for k, v in x.items()}
    return [to_dict(v) for v in x] if isinstance(x, (tuple, list)) else x


def _derived(x: Any, name: str) -> Any:
    """What ``x.name`` becomes when the field is left at ``None``."""
    try:
        return getattr(dataclasses.replace(x, **{name: None}), name)
    except (TypeError, ValueError):
        return dataclasses.MISSING
