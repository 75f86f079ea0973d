"""Loading a ``Config``: YAML files and ``key=value`` overrides merged by OmegaConf onto the defaults, errors that
name the key and the file; ``describe_keys`` (the key table) and ``to_yaml``."""

from __future__ import annotations

import enum
import io
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blockdiff.config import sections, trainer
from blockdiff.config.checks import ConfigError
from blockdiff.config.sections import Config
from blockdiff.files import path_problem

_KEYS_HINT = "`blockdiff config keys` lists every key with its default"


def read_utf8(path: Path, what: str) -> str:
    """The text of ``path``; unreadable or not UTF-8 is a ``ConfigError`` naming ``what`` and the file."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save it "
            "as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror or err}") from None


def _default_of(key: str) -> Any:
    """The default value of dotted ``key`` (``model.family`` -> ``Family.llama``), or ``None`` if unknown."""
    section, _, name = key.partition(".")
    return getattr(getattr(Config(), section, None), name.split(".")[0].split("[")[0], None)


def _explain(err: Exception, key: str, value: Any) -> str:
    """One sentence for a failed merge of ``key=value``: the key, what it accepts, and how to find out more."""
    key = getattr(err, "full_key", None) or key
    value = getattr(err, "value", None) if getattr(err, "full_key", None) else value
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    default = _default_of(key)
    if isinstance(default, enum.Enum):
        choices = ", ".join(m.value for m in type(default))
        return f"{key} must be one of {choices}; got {value!r}"
    if type(err).__name__ == "ConfigKeyError" or "not in '" in reason:  # an unknown key (OmegaConf suggests a near one)
        return f"invalid config key {key!r}: {reason} ({_KEYS_HINT})"
    if isinstance(err, TypeError):  # OmegaConf: a list merged onto a mapping field or the other way round
        kind = "mapping" if isinstance(default, dict) else "list" if isinstance(default, (list, tuple)) else "value"
        return f"{key} must be a {kind} like its default {default}, got {value} ({_KEYS_HINT})"
    return f"invalid value for {key}: {reason} ({_KEYS_HINT})"


def _fields(update: DictConfig):
    """``(section.field, value)`` for every field a mapping sets (a non-mapping section is its own field)."""
    for section, body in update.items_ex(resolve=False):
        if isinstance(body, DictConfig):
            for name, value in body.items_ex(resolve=False):
                yield f"{section}.{name}", value
        else:
            yield str(section), body


def _merge(merged: DictConfig, update: DictConfig | dict, file: Path | None = None) -> DictConfig:
    """Merge a file's (or the recipe defaults') mapping; a failure becomes a ``ConfigError`` naming key and file."""
    try:
        return OmegaConf.merge(merged, update)
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        key, value = str(file or "defaults"), None
        if getattr(err, "full_key", None) is None:  # a bare TypeError (a list where a mapping belongs): find the field
            for field_key, field_value in _fields(OmegaConf.create(update)):
                section, _, name = field_key.partition(".")
                try:
                    OmegaConf.merge(merged, {section: {name: field_value}} if name else {section: field_value})
                except (OmegaConfBaseException, TypeError, ValueError) as inner:
                    err, key, value = inner, field_key, _plain(field_value)
                    break
        where = f"config file {file}: " if file is not None else ""
        raise ConfigError(where + _explain(err, key, value)) from None


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _yaml_problem(err: Exception) -> str:
    """One line for a YAML parser error: the problem (``found duplicate key hidden_size``) and where (line, column)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem is None:  # not a located yaml.MarkedYAMLError: every line of the message, joined
        return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(err, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


def _read_yaml(path: Path) -> DictConfig:
    """A config file as a ``DictConfig``; a missing/special file, bad UTF-8 or bad YAML is a ``ConfigError``
    naming it."""
    problem = path_problem(path)
    if problem is not None:
        raise ConfigError(f"config file {path} {problem}; pass a YAML file with -c")
    text = read_utf8(path, "config file")
    try:
        loaded = OmegaConf.load(io.StringIO(text))
    except Exception as err:  # noqa: BLE001 - YAML syntax errors come in several types
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...), not a list")
    return loaded


def load_config(paths: list[str | Path] = (), overrides: list[str] = (), defaults: dict | None = None) -> Config:
    """Merge YAML files (in order) and ``key=value`` overrides onto the defaults, then validate.

    ``defaults`` (a nested dict, e.g. the fine-tuning recipe's) replaces some built-in defaults first.
    """
    merged: DictConfig = OmegaConf.structured(Config)
    if defaults:
        merged = _merge(merged, defaults)
    for path in paths:
        path = Path(path)
        merged = _merge(merged, _read_yaml(path), path)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"overrides must look like key=value (e.g. model.block_length=8), got {override!r}")
        try:
            update = OmegaConf.from_dotlist([override])
        except Exception as err:  # noqa: BLE001 - OmegaConf and its YAML parser raise several types
            raise ConfigError(f"cannot parse override {override!r}: {str(err).splitlines()[0]}") from None
        try:
            merged = OmegaConf.merge(merged, update)
        except (OmegaConfBaseException, TypeError, ValueError) as err:
            raise ConfigError(_explain(err, key, raw)) from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(_explain(err, key, getattr(err, "value", None))) from None


def describe_keys() -> list[tuple[str, str, str]]:
    """``(key, default, help)`` for every config key; help is the docstring under each field."""
    import ast
    import dataclasses
    import inspect

    helps: dict[tuple[str, str], str] = {}
    for node in [*ast.parse(inspect.getsource(sections)).body, *ast.parse(inspect.getsource(trainer)).body]:
        if isinstance(node, ast.ClassDef):
            for stmt, nxt in zip(node.body, node.body[1:]):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                ):
                    helps[(node.name, stmt.target.id)] = " ".join(str(nxt.value.value).split())
    rows, defaults = [], Config()
    for section in dataclasses.fields(Config):
        sub = getattr(defaults, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            value = value.value if isinstance(value, enum.Enum) else value
            rows.append((f"{section.name}.{f.name}", str(value), helps.get((type(sub).__name__, f.name), "")))
    return rows


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (written next to every run's checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
