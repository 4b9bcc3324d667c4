"""Frozen, validated config dataclasses (pydantic checks types and ranges on creation), and the loading
of params.yaml sections into them with errors that name each offending key::

    params.yaml is invalid:
      - train.defaults.lr = -0.1: Input should be greater than 0
      - models.made.hparams.hiden: unknown key (did you mean 'hidden'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, dataclass_transform

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
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


# --- params.yaml sections -----------------------------------------------------------------------------
# Each domain module owns its section's dataclass; a stage validates just the sections it reads (a small
# schema dataclass whose fields are those sections), so its import closure, and hence its DVC deps, stay
# narrow. ``ardetect.params`` composes every section for whole-file checks.

Device = Literal["auto", "cpu", "cuda"]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
S = TypeVar("S")


class ParamsError(ValueError):
    """params.yaml has unknown keys, wrong types or out-of-range values (all listed in the message)."""


def _fields(tp: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else []


def _discriminator(tp: Any) -> str | None:
    if typing.get_origin(tp) is not Annotated:
        return None
    return next((m.discriminator for m in tp.__metadata__ if getattr(m, "discriminator", None)), None)


def _member(tp: Any, key: str, tag: Any) -> Any:
    """The member of the discriminated union ``tp`` whose ``key`` field is the literal ``tag``."""
    for member in typing.get_args(typing.get_args(tp)[0]):
        if tag in typing.get_args(typing.get_type_hints(member).get(key)):
            return member
    return None


def _walk(schema: Any, loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """``loc`` without the tags pydantic inserts for discriminated unions (``models.made.made.hparams`` →
    ``models.made.hparams``), and the type the last key lives in (for 'did you mean')."""
    tp, out, parent = schema, [], schema
    for part in loc:
        if (key := _discriminator(tp)) is not None:
            tp = _member(tp, key, part)
            continue  # the tag is pydantic's, not a key of the file
        parent = tp
        out.append(part)
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp, include_extras=True).get(str(part))
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        else:
            tp = None
    return tuple(out), parent


def _format(loc: tuple[Any, ...], value: Any, msg: str, valid: list[str]) -> str:
    path = ".".join(str(p) for p in loc)
    if msg.startswith("Unexpected keyword argument") or msg.startswith("Extra inputs"):
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        extra = (
            f" (did you mean {hint[0]!r}?)" if hint else (f" (allowed: {', '.join(valid)})" if valid else "")
        )
        return f"{path}: unknown key{extra}"
    return f"{path} = {value!r}: {msg}"


_TAG_NAMES = {"arch": "architecture"}


def error_lines(
    err: ValidationError, schema: Any, prefix: tuple[Any, ...] = (), valid_fields: list[str] | None = None
) -> list[str]:
    """One line per pydantic error: the key's dotted path, its value, and what is allowed."""
    out = []
    for e in err.errors():
        loc, parent = _walk(schema, tuple(p for p in e["loc"] if p not in ("function-after",)))
        ctx = e.get("ctx", {})
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key = ctx["discriminator"].strip("'")
            if e["type"] == "union_tag_not_found":
                out.append(f"{'.'.join(map(str, prefix + loc + (key,)))}: missing")
                continue
            what = _TAG_NAMES.get(key, key)
            allowed = ", ".join(sorted(t.strip("'") for t in ctx["expected_tags"].split(", ")))
            out.append(_format(prefix + loc + (key,), ctx["tag"], f"unknown {what} (allowed: {allowed})", []))
            continue
        valid = valid_fields if valid_fields is not None else _fields(parent)
        out.append(_format(prefix + loc, e.get("input"), e["msg"], valid))
    return out


def invalid(source: str, problems: list[str]) -> ParamsError:
    return ParamsError(f"{source} is invalid:\n" + "\n".join(f"  - {m}" for m in problems))


def read_params_file(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The parsed YAML mapping; ParamsError when it is missing, not YAML, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the repository root (where dvc.yaml is)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def parse_sections(schema: type[S], raw: Any, source: str = "params.yaml", *, partial: bool = True) -> S:
    """Validate the sections of ``raw`` that ``schema``'s fields name (all of ``raw`` unless ``partial``).

    ``schema`` may define ``problems() -> list[str]`` for checks across keys; every message is collected
    and raised as one ParamsError before any work starts.
    """
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of sections, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    data = {k: v for k, v in raw.items() if k in names} if partial else raw
    try:
        parsed = TypeAdapter(schema).validate_python(data)
    except ValidationError as err:
        raise invalid(source, error_lines(err, schema)) from None
    problems = parsed.problems() if hasattr(parsed, "problems") else []
    if problems:
        raise invalid(source, problems)
    return parsed


def load_sections(schema: type[S], path: str | Path = "params.yaml") -> S:
    """A stage's sections of params.yaml, validated (see :func:`parse_sections`)."""
    return parse_sections(schema, read_params_file(path), str(path))
