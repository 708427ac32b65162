"""Reading project config files: YAML or JSON text to a dict, and ``--set`` style dotted-key overrides.

YAML is read with `ConfigLoader`, a `yaml.SafeLoader` that reads numbers in every ordinary spelling (``1e-5`` is a
float) and refuses duplicate keys. Every failure is a one-line `ConfigError` naming the file (and the line where
there is one). What the parsed sections mean is decided elsewhere: `deepseekmoe_jax.config.DeepseekConfig.from_file`
(``model:``, ``options:``) and the training settings (``train:``, ``data:``, ``mesh:``).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from deepseekmoe_jax.validation import ConfigError

# YAML 1.1 (what PyYAML implements) only calls a scalar a float if it has a dot, so "1e-5" would be read as a
# string. This resolver accepts every spelling Python's float() does (signs, exponents without a dot, "_" digit
# separators, ".5", "1.") plus YAML's .inf/.nan and base-60 floats, and only in this project's loader.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9][0-9_]*)?
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9][0-9_]*)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9][0-9_]*
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping of a YAML file names the same key twice."""

    def __init__(self, key, first: int, line: int):
        super().__init__(problem=f"duplicate key {key!r} (first at line {first})")
        self.key, self.first, self.line = key, first, line


class ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with `_FLOAT_RE` for floats and duplicate keys refused (`DuplicateKeyError`)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # refused by the base class with its own message
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text with `ConfigLoader` (numbers in every ordinary spelling, no duplicate keys)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_error_text(e: yaml.YAMLError) -> str:
    """One line: where (line, column) and what, without PyYAML's multi-line excerpt of the file."""
    if isinstance(e, DuplicateKeyError):
        return f"line {e.line}: {e.problem}; remove one of them"
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a ``.yaml``/``.yml``/``.json`` config. A bare HF config.json becomes ``{"model": {...}}``.

    YAML is read with `ConfigLoader`: numbers in every ordinary spelling (``1e-5`` is a float, as for ``--set``)
    and duplicate keys refused; JSON objects may not repeat a key either. Every failure is a one-line
    `ConfigError` naming the file (and the line where there is one)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "a config file is YAML or JSON text"
        ) from None
    try:
        raw = json.loads(text, object_pairs_hook=_unique_json_object) if path.endswith(".json") else load_yaml(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}: {_yaml_error_text(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot parse: {_yaml_error_text(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(raw).__name__}")
    if path.endswith(".json") and "model" not in raw:
        raw = {"model": raw}
    return raw


def _unique_json_object(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key {key!r} in a JSON object; remove one of them")
        out[key] = value
    return out


def parse_value(text: str) -> Any:
    """Parse an override value the way a config file would (``1e-3``, ``true``, ``null``, ``[1, 2]``); text
    that is not valid YAML stays a string."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a deep copy of ``raw`` with dotted-key ``overrides`` applied (``{"options.dtype": "bfloat16"}``)."""
    out = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {key!r}: expected a dotted key such as train.steps")
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {key!r}: '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return out
