"""One loader for a component's startup settings: the operator's and the gate's.

A component's settings are one frozen dataclass, built once at startup from
sources merged in precedence order, highest first:

1. what the caller passes (the gate's command-line options),
2. environment variables `<PREFIX><SETTING>` (upper-case setting name),
3. a YAML file whose top-level keys are the setting names,
4. the defaults of the dataclass.

Each component keeps what is its own: how a setting's text becomes a value
(`coerce`), environment variables that are not one setting each (the
operator's Prometheus endpoints), and checks across settings. Every bad value
is reported as the component's `SettingError` naming the setting.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from batchpilot.contract.errors import FieldError

T = TypeVar("T")


class SettingError(FieldError):
    """A setting is invalid; `setting` names it. Each component raises its own
    subclass (`GateSettingsError`, the operator's `ConfigError`)."""

    @property
    def setting(self) -> str:
        return self.field


def read_settings_file(path: Path, error: type[SettingError]) -> dict[str, Any]:
    """The settings in a YAML file; an empty file holds none."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise error("config", f"cannot read {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise error("config", f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error("config", f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def settings_from_env(
    cls: type[Any],
    env: Mapping[str, str],
    prefix: str,
    *,
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """`<prefix><SETTING>` for each setting of `cls` but `skip`, as text or through its parser."""
    values: dict[str, Any] = {}
    for spec_field in fields(cls):
        raw = env.get(prefix + spec_field.name.upper())
        if raw is not None and spec_field.name not in skip:
            parser = (parsers or {}).get(spec_field.name)
            values[spec_field.name] = parser(raw) if parser is not None else raw
    return values


def build_settings(
    cls: type[T],
    sources: Sequence[Mapping[str, Any]],
    coerce: Callable[[str, Any], Any],
    error: type[SettingError],
) -> T:
    """`cls` from `sources`, lowest precedence first; unknown names are errors."""
    merged: dict[str, Any] = {}
    for source in sources:
        merged.update(source)
    known = sorted(spec_field.name for spec_field in fields(cls))  # type: ignore[arg-type]
    unknown = sorted(set(merged) - set(known), key=str)
    if unknown:
        raise error(unknown[0], f"unknown setting; known settings are {', '.join(known)}")
    return cls(**{name: coerce(name, raw) for name, raw in merged.items()})
