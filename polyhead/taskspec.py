"""The task-spec format: a task id plus how to build its environment, and suites of them in TOML.

A suite file has an optional ``[suite]`` table (``name``, ``description``) and one ``[[task]]`` table per
task::

    [[task]]
    id = "cartpole-long-pole"          # unique, [a-z0-9][a-z0-9._-]*
    env = "CartPole-v1"                # gymnasium id
    role = "train"                     # "train" (default) or "heldout" (reserved for the online updater)
    target_return = 475.0              # what "solved" means for this task
    max_episode_steps = 0              # 0: the environment's own limit
    kwargs = { }                       # gymnasium.make keyword arguments
    attrs = { length = 0.75 }          # set on env.unwrapped after construction (physics variants)
    [[task.wrappers]]                  # optional project wrappers (polyhead.envs.WRAPPERS)
    name = "target-position"
    params = { target = 1.0, weight = 0.5 }

Each task has an encoder (its observation normaliser and a network into the shared embedding). By
default every task gets its own MLP encoder; ``[[encoder]]`` tables name groups of tasks that share one,
and say what kind of network it is::

    [[encoder]]
    name = "cartpole"                  # unique, same pattern as task ids
    tasks = ["cartpole-long-pole", "cartpole-heavy-pole"]   # tasks with the same observation width
    kind = "mlp"                       # "mlp" (vectors) or "cnn" (an image, flattened, + extra values)
    hidden = []                        # hidden sizes before the embedding layer
    image_shape = [7, 7, 3]            # cnn only: height, width, channels of the leading image values
    pad = false                        # true: tasks of different widths share one zero-padded encoder

This module checks the structure (types, ids, duplicates) without importing gymnasium;
:func:`polyhead.envs.validate_task` checks that the environment really builds (env id, attribute names
and types, wrapper names and parameters). Every error names the task and the field.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from polyhead.errors import InvalidTaskSpec
from polyhead.v1 import types_pb2

TASK_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
Scalar = int | float | bool | str
Role = Literal["train", "heldout"]
EncoderKind = Literal["mlp", "cnn"]

_TASK_KEYS = {
    "id",
    "env",
    "role",
    "target_return",
    "max_episode_steps",
    "kwargs",
    "attrs",
    "wrappers",
    "description",
}


@dataclass(frozen=True)
class WrapperSpec:
    """A project wrapper by registered name, with its parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """One task: an id and the recipe for its environment (see the module docstring)."""

    id: str
    env: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    wrappers: tuple[WrapperSpec, ...] = ()
    target_return: float = math.nan
    max_episode_steps: int = 0
    role: Role = "train"
    description: str = ""

    # --- JSON (bundle metadata) -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "env": self.env,
            "role": self.role,
            "target_return": None if math.isnan(self.target_return) else self.target_return,
            "max_episode_steps": self.max_episode_steps,
            "kwargs": dict(self.kwargs),
            "attrs": dict(self.attrs),
            "wrappers": [{"name": w.name, "params": dict(w.params)} for w in self.wrappers],
            "description": self.description,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = "task spec") -> TaskSpec:
        return parse_task(data, source=source)

    # --- protobuf (the wire) --------------------------------------------------------------------------
    def to_proto(self) -> types_pb2.TaskSpec:
        return types_pb2.TaskSpec(
            id=self.id,
            env=self.env,
            kwargs_json=json.dumps(self.kwargs, sort_keys=True),
            attrs_json=json.dumps(self.attrs, sort_keys=True),
            wrappers=[
                types_pb2.WrapperSpec(name=w.name, params_json=json.dumps(w.params, sort_keys=True))
                for w in self.wrappers
            ],
            target_return=self.target_return,
            description=self.description,
            max_episode_steps=self.max_episode_steps,
        )

    @classmethod
    def from_proto(cls, msg: types_pb2.TaskSpec) -> TaskSpec:
        def load(text: str, what: str) -> Any:
            try:
                return json.loads(text) if text else {}
            except json.JSONDecodeError as exc:
                raise InvalidTaskSpec(f"task {msg.id!r}: {what} is not valid JSON: {exc}") from exc

        return parse_task(
            {
                "id": msg.id,
                "env": msg.env,
                "kwargs": load(msg.kwargs_json, "kwargs_json"),
                "attrs": load(msg.attrs_json, "attrs_json"),
                "wrappers": [
                    {"name": w.name, "params": load(w.params_json, f"wrapper {w.name!r} params_json")}
                    for w in msg.wrappers
                ],
                "target_return": None if math.isnan(msg.target_return) else msg.target_return,
                "description": msg.description,
                "max_episode_steps": msg.max_episode_steps,
            },
            source="TaskSpec message",
        )


_ENCODER_KEYS = {"name", "tasks", "kind", "hidden", "image_shape", "pad"}


@dataclass(frozen=True)
class EncoderSpec:
    """A named encoder group: the tasks that share one encoder and the kind of network it is.

    ``image_shape`` (height, width, channels) is for ``kind = "cnn"``: the first h*w*c values of a
    flattened observation are that image (channels last, as MiniGrid's view), the rest are extra values
    appended after the convolutions. ``pad``: tasks whose observations have different widths may share it,
    each zero-padded to the widest (the padded single-encoder baseline).
    """

    name: str
    tasks: tuple[str, ...]
    kind: EncoderKind = "mlp"
    hidden: tuple[int, ...] = ()
    image_shape: tuple[int, ...] = ()
    pad: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tasks": list(self.tasks),
            "kind": self.kind,
            "hidden": list(self.hidden),
            "image_shape": list(self.image_shape),
            "pad": self.pad,
        }


def parse_encoder(data: Any, *, source: str, task_ids: set[str]) -> EncoderSpec:
    """Build an EncoderSpec from a ``[[encoder]]`` table; raises InvalidTaskSpec naming the field."""
    if not isinstance(data, dict):
        raise InvalidTaskSpec(f"{source}: an [[encoder]] must be a table, got {type(data).__name__}")
    name = data.get("name")
    label = f"{source}: encoder {name!r}"
    if not isinstance(name, str) or not TASK_ID_RE.match(name):
        raise InvalidTaskSpec(f"{label}: field 'name' must be a string matching {TASK_ID_RE.pattern}")
    unknown = sorted(set(data) - _ENCODER_KEYS)
    if unknown:
        raise InvalidTaskSpec(
            f"{label}: unknown field(s) {unknown}; expected some of {sorted(_ENCODER_KEYS)}"
        )
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise InvalidTaskSpec(f"{label}: field 'tasks' must be a non-empty array of task ids")
    missing = sorted(set(tasks) - task_ids)
    if missing:
        raise InvalidTaskSpec(f"{label}: field 'tasks' names unknown task(s) {missing}")
    kind = data.get("kind", "mlp")
    if kind not in ("mlp", "cnn"):
        raise InvalidTaskSpec(f"{label}: field 'kind' must be 'mlp' or 'cnn', got {kind!r}")
    sizes: dict[str, tuple[int, ...]] = {}
    for key in ("hidden", "image_shape"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            raise InvalidTaskSpec(f"{label}: field '{key}' must be an array of positive integers")
        sizes[key] = tuple(value)
    if kind == "cnn" and len(sizes["image_shape"]) != 3:
        raise InvalidTaskSpec(
            f"{label}: a cnn encoder needs field 'image_shape' = [height, width, channels], "
            f"got {list(sizes['image_shape'])}"
        )
    pad = data.get("pad", False)
    if not isinstance(pad, bool):
        raise InvalidTaskSpec(f"{label}: field 'pad' must be true or false")
    return EncoderSpec(
        name=name,
        tasks=tuple(tasks),
        kind=kind,
        hidden=sizes["hidden"],
        image_shape=sizes["image_shape"],
        pad=pad,
    )


@dataclass(frozen=True)
class Suite:
    """A named, ordered collection of tasks, and the encoder groups some of them share."""

    name: str
    tasks: tuple[TaskSpec, ...]
    description: str = ""
    source: str = ""
    encoders: tuple[EncoderSpec, ...] = ()

    def encoder_for(self, task_id: str) -> EncoderSpec:
        """The task's encoder group: the ``[[encoder]]`` naming it, else its own MLP encoder (named after
        the task)."""
        for spec in self.encoders:
            if task_id in spec.tasks:
                return spec
        return EncoderSpec(name=task_id, tasks=(task_id,))

    @property
    def train_tasks(self) -> tuple[TaskSpec, ...]:
        return tuple(t for t in self.tasks if t.role == "train")

    @property
    def heldout_tasks(self) -> tuple[TaskSpec, ...]:
        return tuple(t for t in self.tasks if t.role == "heldout")

    def task(self, task_id: str) -> TaskSpec:
        for t in self.tasks:
            if t.id == task_id:
                return t
        known = ", ".join(t.id for t in self.tasks)
        raise InvalidTaskSpec(f"suite {self.name!r} has no task {task_id!r}; tasks: {known}")


def _check_json_value(value: Any, where: str) -> None:
    if isinstance(value, bool | int | str) or value is None:
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidTaskSpec(f"{where}: {value} is not a finite number")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_value(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidTaskSpec(f"{where}: keys must be strings, got {k!r}")
            _check_json_value(v, f"{where}.{k}")
        return
    raise InvalidTaskSpec(f"{where}: unsupported value {value!r} of type {type(value).__name__}")


def parse_task(data: Any, *, source: str = "task spec") -> TaskSpec:
    """Build a TaskSpec from a mapping (a TOML ``[[task]]`` table or its JSON form).

    Raises InvalidTaskSpec naming the task and the field for any structural problem.
    """
    if not isinstance(data, dict):
        raise InvalidTaskSpec(f"{source}: a task must be a table, got {type(data).__name__}")
    task_id = data.get("id")
    label = f"{source}: task {task_id!r}" if task_id is not None else f"{source}: task"
    if not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
        raise InvalidTaskSpec(
            f"{label}: field 'id' must be a string matching {TASK_ID_RE.pattern} (lower case, digits, "
            f"'.', '_', '-'), got {task_id!r}"
        )
    unknown = sorted(set(data) - _TASK_KEYS)
    if unknown:
        raise InvalidTaskSpec(f"{label}: unknown field(s) {unknown}; expected some of {sorted(_TASK_KEYS)}")
    env = data.get("env")
    if not isinstance(env, str) or not env:
        raise InvalidTaskSpec(f"{label}: field 'env' must be a gymnasium environment id string, got {env!r}")
    role = data.get("role", "train")
    if role not in ("train", "heldout"):
        raise InvalidTaskSpec(f"{label}: field 'role' must be 'train' or 'heldout', got {role!r}")
    target = data.get("target_return")
    if target is None:
        target_f = math.nan
    elif isinstance(target, int | float) and not isinstance(target, bool) and math.isfinite(target):
        target_f = float(target)
    else:
        raise InvalidTaskSpec(f"{label}: field 'target_return' must be a finite number, got {target!r}")
    max_steps = data.get("max_episode_steps", 0)
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        raise InvalidTaskSpec(
            f"{label}: field 'max_episode_steps' must be a non-negative integer, got {max_steps!r}"
        )
    mappings: dict[str, dict[str, Any]] = {}
    for name in ("kwargs", "attrs"):
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise InvalidTaskSpec(f"{label}: field '{name}' must be a table, got {type(value).__name__}")
        _check_json_value(value, f"{label}: field '{name}'")
        mappings[name] = dict(value)
    wrappers_raw = data.get("wrappers", [])
    if not isinstance(wrappers_raw, list):
        raise InvalidTaskSpec(f"{label}: field 'wrappers' must be an array of tables")
    wrappers = []
    for i, w in enumerate(wrappers_raw):
        where = f"{label}: field 'wrappers[{i}]'"
        if not isinstance(w, dict) or not isinstance(w.get("name"), str):
            raise InvalidTaskSpec(f"{where} must be a table with a string 'name'")
        extra = sorted(set(w) - {"name", "params"})
        if extra:
            raise InvalidTaskSpec(f"{where}: unknown field(s) {extra}; expected 'name' and 'params'")
        params = w.get("params", {})
        if not isinstance(params, dict):
            raise InvalidTaskSpec(f"{where}: 'params' must be a table")
        _check_json_value(params, f"{where}.params")
        wrappers.append(WrapperSpec(name=w["name"], params=dict(params)))
    description = data.get("description", "")
    if not isinstance(description, str):
        raise InvalidTaskSpec(f"{label}: field 'description' must be a string")
    return TaskSpec(
        id=task_id,
        env=env,
        kwargs=mappings["kwargs"],
        attrs=mappings["attrs"],
        wrappers=tuple(wrappers),
        target_return=target_f,
        max_episode_steps=max_steps,
        role=role,
        description=description,
    )


def parse_suite(text: str, *, source: str, default_name: str = "custom") -> Suite:
    """Parse suite TOML text. Raises InvalidTaskSpec (bad TOML, no tasks, duplicate ids, bad fields)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidTaskSpec(f"{source}: not valid TOML: {exc}") from exc
    unknown = sorted(set(doc) - {"suite", "task", "encoder"})
    if unknown:
        raise InvalidTaskSpec(
            f"{source}: unknown top-level key(s) {unknown}; expected [suite], [[task]] and [[encoder]]"
        )
    meta = doc.get("suite", {})
    if not isinstance(meta, dict):
        raise InvalidTaskSpec(f"{source}: [suite] must be a table")
    raw_tasks = doc.get("task")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise InvalidTaskSpec(f"{source}: no tasks; add at least one [[task]] table")
    tasks: list[TaskSpec] = []
    seen: set[str] = set()
    for raw in raw_tasks:
        task = parse_task(raw, source=source)
        if task.id in seen:
            raise InvalidTaskSpec(f"{source}: task {task.id!r}: duplicate id (field 'id' must be unique)")
        seen.add(task.id)
        tasks.append(task)
    raw_encoders = doc.get("encoder", [])
    if not isinstance(raw_encoders, list):
        raise InvalidTaskSpec(f"{source}: 'encoder' must be an array of [[encoder]] tables")
    encoders: list[EncoderSpec] = []
    grouped: dict[str, str] = {}
    for raw in raw_encoders:
        spec = parse_encoder(raw, source=source, task_ids=seen)
        if any(e.name == spec.name for e in encoders) or spec.name in seen - set(spec.tasks):
            raise InvalidTaskSpec(f"{source}: encoder {spec.name!r}: duplicate or clashing name")
        for task_id in spec.tasks:
            if task_id in grouped:
                raise InvalidTaskSpec(
                    f"{source}: task {task_id!r} is in encoder groups {grouped[task_id]!r} and "
                    f"{spec.name!r}; a task has one encoder"
                )
            grouped[task_id] = spec.name
        encoders.append(spec)
    return Suite(
        name=str(meta.get("name", default_name)),
        tasks=tuple(tasks),
        description=str(meta.get("description", "")),
        source=source,
        encoders=tuple(encoders),
    )


def builtin_suites() -> list[str]:
    """Names of the suites shipped with the package."""
    root = resources.files("polyhead") / "suites"
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def load_suite(name_or_path: str | Path) -> Suite:
    """Load a built-in suite by name, or a suite TOML file by path.

    Raises InvalidTaskSpec when neither exists or the file is invalid.
    """
    text_name = str(name_or_path)
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise InvalidTaskSpec(f"suite file {path} does not exist")
        return parse_suite(path.read_text(encoding="utf-8"), source=str(path), default_name=path.stem)
    resource = resources.files("polyhead") / "suites" / f"{text_name}.toml"
    if not resource.is_file():
        raise InvalidTaskSpec(
            f"unknown suite {text_name!r}: not a file and not a built-in suite "
            f"(built-in: {', '.join(builtin_suites())})"
        )
    return parse_suite(
        resource.read_text(encoding="utf-8"), source=f"suite {text_name}", default_name=text_name
    )


def load_task_spec(ref: str | Path) -> TaskSpec:
    """A single task: a TOML file with exactly one ``[[task]]``, or ``SUITE:TASK_ID`` for a suite's task."""
    text = str(ref)
    if ":" in text and not Path(text).exists():
        suite_name, task_id = text.split(":", 1)
        return load_suite(suite_name).task(task_id)
    suite = load_suite(ref)
    if len(suite.tasks) != 1:
        raise InvalidTaskSpec(
            f"{ref}: a task-spec file must hold exactly one [[task]] table, found {len(suite.tasks)}"
        )
    return suite.tasks[0]
