"""Command-line options generated from the trainer's frozen config dataclasses.

Every field becomes ``--field-name`` with the field's ``metadata["help"]`` as its help text and the
dataclass default as its default, so the config class is the one place a setting is documented.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 64,64, got {text!r}"
        ) from None


def _weights(text: str) -> tuple[tuple[str, float], ...]:
    out = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        task, sep, weight = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out.append((task.strip(), float(weight)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected TASK=WEIGHT pairs like cartpole=2,acrobot=1, got {item!r}"
            ) from None
    return tuple(out)


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        if value and isinstance(value[0], tuple):
            return ",".join(f"{k}={v:g}" for k, v in value) or "none"
        return ",".join(str(v) for v in value) or "empty"
    return str(value)


def add_dataclass_options(
    parser: argparse.ArgumentParser | Any, cls: type[Any], *, skip: tuple[str, ...] = ()
) -> None:
    """Add one option per field of the dataclass ``cls`` (a parser or an argument group)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default
        help_text = f"{f.metadata.get('help', '')} (default: {_show(default)})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        elif hint is int or hint is float:
            kwargs["type"] = hint
            kwargs["metavar"] = "N" if hint is int else "X"
        elif hint == (float | None):
            kwargs["type"] = _optional_float
            kwargs["metavar"] = "X|none"
        elif hint == tuple[int, ...]:
            kwargs["type"] = _int_tuple
            kwargs["metavar"] = "N,N"
        elif hint == tuple[tuple[str, float], ...]:
            kwargs["type"] = _weights
            kwargs["metavar"] = "TASK=W,..."
        else:  # pragma: no cover - a new field type must be taught here
            raise TypeError(f"no command-line parser for {cls.__name__}.{f.name}: {hint}")
        parser.add_argument(flag, **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from the parsed options (fields not on the command line keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return cls(**values)
