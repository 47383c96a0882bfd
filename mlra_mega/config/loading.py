"""Loading a configuration: YAML (optional) merged with `section.key=value` overrides, every key
checked against the schema (unknown ones refused with the closest valid key), every value
converted to its field's type, the whole config validated once (`load_config`); and the way
back: plain dicts, masked dicts for what we write, dotted keys.

YAML is read strictly: duplicated keys are an error, and a document whose aliases expand past
MAX_YAML_NODES values is refused before it is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mlra_mega.config.schema import RunConfig, _all_dotted_keys, _did_you_mean, _show, key_of
from mlra_mega.credentials import mask
from mlra_mega.errors import ConfigError

__all__ = ["MAX_YAML_NODES", "RENAMED", "load_config", "migrate_saved", "model_identity", "with_values", "from_dict", "to_dict", "public_dict", "flatten",
           "read_yaml_document"]

MAX_YAML_NODES = 100_000  # a config is a few hundred nodes; an alias bomb expands to billions

# Keys a release replaced: {old dotted key: (new dotted key, {old value: new value})}. A user's
# config with an old key is a one-line error naming the new one; a config this framework saved
# earlier (a checkpoint's sidecar) is read through `migrate_saved`.
RENAMED: dict[str, tuple[str, dict[Any, Any]]] = {
    "train.activation_checkpointing": ("train.recompute", {True: "full", False: "none"}),
}


def migrate_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config (nested dict) with every `RENAMED` key written as its replacement."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, (new, values) in RENAMED.items():
        old_section, old_key = old.split(".")
        section = out.get(old_section)
        if isinstance(section, dict) and old_key in section:
            value = section.pop(old_key)
            new_section, new_key = new.split(".")
            out.setdefault(new_section, {}).setdefault(new_key, values.get(value, value))
    return out


def model_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The dotted `model.*` values of a config dict (a saved one, or the run's own) with every
    key a later release added at its default and `tie_embeddings` resolved from `arch` (it was a
    plain true before `arch` existed), so two configs of one model compare equal whichever release
    wrote them."""
    from mlra_mega.config.schema import ModelConfig

    model = from_dict(ModelConfig, migrate_saved(config).get("model", {}), "model.")
    # Only the default that a release changed from a value to null is made explicit: making the
    # derived widths explicit too would list them beside the change they follow from.
    model = dataclasses.replace(model, tie_embeddings=model.tied_embeddings)
    return {f"model.{k}": v for k, v in flatten(model).items()}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (or defaults) + `a.b=value` overrides -> a validated RunConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(data, key, value)
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def with_values(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """`cfg` with `{dotted key: value}` set (dataclass replacement: each value converted and
    checked against its field's type as a YAML value would be), validated again."""
    for key, value in values.items():
        cfg = _replace_dotted(cfg, key.split("."), value, "")
    cfg.validate()
    return cfg


def _replace_dotted(node: Any, parts: list[str], value: Any, prefix: str) -> Any:
    fields = {key_of(f.name): f for f in dataclasses.fields(node)}
    head = parts[0]
    if head not in fields:
        raise ConfigError(f"{prefix}{head}", "unknown key",
                          _closest_key_hint(head, list(fields), prefix) or f"valid keys: {sorted(fields)}")
    name = fields[head].name
    if len(parts) == 1:
        new = _coerce(value, typing.get_type_hints(type(node))[name], f"{prefix}{head}")
    else:
        child = getattr(node, name)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{prefix}{head}", "is a value, not a section", "check the dotted key")
        new = _replace_dotted(child, parts[1:], value, f"{prefix}{head}.")
    return dataclasses.replace(node, **{name: new})


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a mapping, converting and checking every key on the way."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a mapping of keys, got {type(data).__name__} {_show(data)}",
                          f"write {where} as `key: value` lines")
    hints = typing.get_type_hints(cls)
    fields = {key_of(f.name): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        if f"{prefix}{key}" in RENAMED:
            new, values = RENAMED[f"{prefix}{key}"]
            raise ConfigError(f"{prefix}{key}", f"was replaced by {new}",
                              f"write {new}=" + " or ".join(f"{v} (for {k!r})" for k, v in values.items()))
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", "unknown key",
                              _closest_key_hint(key, list(fields), prefix) or f"valid keys: {sorted(fields)}")
        kwargs[fields[key].name] = _coerce(value, hints[fields[key].name], f"{prefix}{key}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe mapping (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {key_of(f.name): plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def public_dict(cfg: Any) -> dict[str, Any]:
    """`to_dict` with credentials in any value masked: what we write to files, logs and MLflow."""

    def masked(value: Any) -> Any:
        if isinstance(value, str):
            return mask(value)
        if isinstance(value, dict):
            return {k: masked(v) for k, v in value.items()}
        if isinstance(value, list):
            return [masked(v) for v in value]
        return value

    return masked(to_dict(cfg))


def flatten(cfg: Any) -> dict[str, Any]:
    """`{"model.hidden_size": 768, ...}`: the dotted keys the overrides use (a config or its dict)."""
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = value

    walk(cfg if isinstance(cfg, dict) else to_dict(cfg), "")
    return out


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses duplicated keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the mapping constructor reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicated key {_show(key)} (the last one would win silently)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes in the document with every alias expanded (counted once per node, memoised, so a
    bomb is measured without being built); stops counting past `limit`."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = limit + 1  # a node inside itself (a recursive alias) counts as too big
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        sizes[id(node)] = min(total, limit + 1)
        return sizes[id(node)]

    return size(root)


def read_yaml_document(text: str, what: str) -> Any:
    """One YAML document, safely: duplicated keys and oversized alias expansions are ConfigErrors."""
    loader = None
    try:
        loader = _StrictLoader(text)  # its reader refuses some characters at once
        root = loader.get_single_node()
        if root is None:
            return None
        if _expanded_size(root, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError("config", f"{what} expands to more than {MAX_YAML_NODES:,} values through its "
                              "aliases (&anchor / *alias)", "write the values out, or use fewer nested aliases")
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0][:200]
        raise ConfigError("config", f"{what} is not valid YAML{at}: {problem}", "fix the YAML there") from None
    except RecursionError:
        raise ConfigError("config", f"{what} nests too deeply", "write a flatter YAML document") from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        is_file = path.is_file()
    except OSError:  # a name too long for the file system
        is_file = False
    if not is_file:
        raise ConfigError("config", f"file {_show(str(path))} not found", "pass the path of an existing YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"cannot read {path}: {exc}", "pass a readable UTF-8 YAML file") from None
    data = read_yaml_document(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} holds a {type(data).__name__}, not a mapping of sections",
                          "write sections such as `model:` and `train:` at the top level")
    return data


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("override", f"{_show(item)} is not of the form section.key=value",
                          "write overrides like model.hidden_size=512")
    return key, value


def _set_dotted(data: dict[str, Any], key: str, raw: str) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is a value, not a section, so {key!r} cannot be set",
                              "check the dotted key")
        node = child
    # Kept as text: the field's type decides how it is parsed (a str field stays "007").
    node[parts[-1]] = _OverrideText(raw)


class _OverrideText(str):
    """A value from the command line, still text; parsed once its field's type is known."""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~", ""}


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, _OverrideText) and value.strip().lower() in _NONE):
            return None
        if len(non_none) == 1:
            return _coerce(value, non_none[0], name)
        raise TypeError(f"unsupported union type for {name}: {hint}")  # a bug in our dataclasses

    if origin is Literal:
        text = str(value).strip() if isinstance(value, _OverrideText) else value
        if text not in args:
            raise ConfigError(name, f"{_show(text)} is not one of {list(args)}",
                              f"use one of {list(args)}{_did_you_mean(str(text), [str(a) for a in args])}")
        return text

    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{name}.")

    if origin in (list, tuple):
        items = value
        if isinstance(value, _OverrideText):
            items = _parse_list_text(value)
        if not isinstance(items, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {_show(items)}", "write it as [a, b] or a,b")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(name, f"expected {len(args)} values, got {len(items)}: {_show(list(items))}",
                                  f"give exactly {len(args)} values")
            return tuple(_coerce(_text_if(v, value), a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        item_type = args[0] if args else Any
        out = [_coerce(_text_if(v, value), item_type, f"{name}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out

    if hint is Any:
        return value
    if isinstance(value, dict):
        raise ConfigError(name, f"is a value, not a section, but got keys {sorted(value)}",
                          f"set it directly, as {name}=VALUE")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(name, f"expected true or false, got {_show(value)}", "write true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected an integer, got {_show(value)}", "write a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(name, f"expected an integer, got {_show(value)}", "write a whole number such as 8")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected a number, got {_show(value)}", "write a number such as 3e-4")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except (ValueError, OverflowError):
                pass
        if number is None:
            raise ConfigError(name, f"expected a number, got {_show(value)}", "write a number such as 3e-4")
        if not math.isfinite(number):
            # No field of ours means anything at nan or inf (an lr of inf poisons the weights at step 1).
            raise ConfigError(name, f"must be a finite number, got {_show(value)}", "write a number such as 3e-4")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(name, f"expected text, got {type(value).__name__} {_show(value)}", "write a single value")
        return str(value)
    raise TypeError(f"unsupported field type for {name}: {hint}")  # a bug in our dataclasses


def _text_if(item: Any, container: Any) -> Any:
    """Items of a list given on the command line stay text, to be parsed by their own type."""
    return _OverrideText(item) if isinstance(container, _OverrideText) else item


def _parse_list_text(text: str) -> list[str]:
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    return [part.strip().strip("'\"") for part in body.split(",") if part.strip()]


def _closest_key_hint(key: str, siblings: list[str], prefix: str) -> str | None:
    match = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if match:
        return f"did you mean '{prefix}{match[0]}'?"
    # A key put in the wrong section: look through every dotted key for its leaf name.
    full = _all_dotted_keys()
    leaf_matches = [k for k in full if k.rsplit(".", 1)[-1] == key]
    if leaf_matches:
        return f"did you mean {leaf_matches[0]!r}?"
    match = difflib.get_close_matches(f"{prefix}{key}", full, n=1, cutoff=0.6)
    if match:
        return f"did you mean {match[0]!r}?"
    return None
