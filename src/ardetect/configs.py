"""Frozen, validated config dataclasses for models (pydantic checks types and ranges on creation)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, dataclass_transform

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as _pydantic_dataclass

T = TypeVar("T")


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field))
def config_dataclass(cls: type[T]) -> type[T]:
    """A frozen dataclass whose fields are validated and whose unknown keywords are errors."""
    return _pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)  # type: ignore[return-value]


def as_plain(value: Any) -> Any:
    """Tuples to lists, recursively, so configs round-trip through YAML/JSON and safe torch.load."""
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return value


def narrow(config: Any, cls: type[T]) -> T:
    """The ``cls`` part of a config that extends it (e.g. a params section adding ``device``)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
