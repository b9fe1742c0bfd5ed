"""The bundle format (the model repository): one trunk, versioned per-task adapters, and the metadata.

Layout of a bundle directory (format version 2)::

    manifest.json                        format version, trunk files + sha256, embedding size E, feature
                                         size F, the encoder groups the suite trained
    trunk.onnx                           embedding [B, E] -> features [B, F]
    trunk.pt                             torch checkpoint of the policy, for the online updater
    heads/<task>/<version>/encoder.onnx  obs [B, d] (the task's own flat observation) -> embedding [B, E],
                                         obs_norm [B, n] (its normaliser's statistics frozen in)
    heads/<task>/<version>/head.onnx     features (and obs_norm) -> logits | mean, log_std ; value
    heads/<task>/<version>/head.json     task spec, spaces, trunk sha256, encoder and head sha256,
                                         encoder group and architecture, training summary, eval
    heads/<task>/active.json             {"version": N}: the version a server activates for the task

A task version is its **adapter**: encoder and head, versioned, published and swapped together. The
encoder is its own graph rather than fused into the head because the shared trunk runs between them: a
server runs each encoder on its rows, then one trunk pass for the whole mixed batch, then the heads.
Tasks of one encoder group carry byte-identical ``encoder.onnx`` files (same sha256) until one of them
adapts its own; a server runs identical encoders as one.

Format version 1 (still read and served): no encoders; ``trunk.onnx`` takes observations flattened and
zero-padded to the manifest's ``observation.size`` D (``obs`` [B, D] -> ``features``, ``obs_norm``
[B, D], one normaliser frozen in) and heads read those.

Every write is atomic: a head version is written into a hidden temporary directory under
``heads/<task>/`` and renamed into place; pointer files are replaced with ``os.replace``; a new bundle is
built in a temporary sibling directory and renamed. A reader therefore never sees half a head: a version
directory exists completely or not at all, and readers ignore dot-directories.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from polyhead import __version__
from polyhead.errors import (
    BundleError,
    BundleIntegrityError,
    BundleNotFound,
    CorruptHead,
    IncompatibleHead,
    UnknownTask,
    UnknownVersion,
    UnsupportedBundleVersion,
    VersionConflict,
)
from polyhead.spaces import SpaceSpec, space_from_json, space_to_json
from polyhead.taskspec import TaskSpec

FORMAT_NAME = "polyhead-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TRUNK_ONNX = "trunk.onnx"
TRUNK_CHECKPOINT = "trunk.pt"
HEADS_DIR = "heads"
HEAD_ONNX = "head.onnx"
ENCODER_ONNX = "encoder.onnx"
HEAD_JSON = "head.json"
ACTIVE_JSON = "active.json"
#: A head writer's temporary ``.vN-*`` directory older than this belongs to a writer that died mid-publish
#: (a publish takes seconds); the next publish of that task removes it.
STALE_TEMP_S = 3600.0

Distribution = Literal["categorical", "gaussian"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with JSON ``data`` so a reader sees the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    _write_file(tmp, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleNotFound(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{what} {path} must hold a JSON object")
    return data


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class Normalization:
    """Observation normalisation frozen into the trunk: ``clip((obs - mean) / sqrt(var + eps))``."""

    mean: tuple[float, ...]
    var: tuple[float, ...]
    clip: float = 10.0
    epsilon: float = 1e-8

    def to_json(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "var": list(self.var), "clip": self.clip, "epsilon": self.epsilon}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Normalization:
        return cls(
            mean=tuple(float(v) for v in data["mean"]),
            var=tuple(float(v) for v in data["var"]),
            clip=float(data.get("clip", 10.0)),
            epsilon=float(data.get("epsilon", 1e-8)),
        )


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` records about a bundle (heads are described by their own head.json).

    Format 2: ``embedding_size`` E is the trunk's input width and ``encoders`` the groups trained
    (name -> architecture and tasks). Format 1: ``observation_size`` D and ``normalization`` describe the
    padded trunk input instead (``embedding_size`` 0).
    """

    trunk_sha256: str
    checkpoint_sha256: str
    feature_size: int
    suite: str
    tasks: tuple[str, ...]
    embedding_size: int = 0
    encoders: dict[str, Any] = field(default_factory=dict)
    observation_size: int = 0
    normalization: Normalization | None = None
    trunk_architecture: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    polyhead_version: str = __version__
    format_version: int = FORMAT_VERSION

    @property
    def has_encoders(self) -> bool:
        """True from format 2: every task version brings its encoder, the trunk takes embeddings."""
        return self.format_version >= 2

    @property
    def trunk_input_size(self) -> int:
        return self.embedding_size if self.has_encoders else self.observation_size

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "polyhead_version": self.polyhead_version,
            "created_at": self.created_at,
            "suite": self.suite,
            "tasks": list(self.tasks),
            "trunk": {
                "onnx": TRUNK_ONNX,
                "sha256": self.trunk_sha256,
                "checkpoint": TRUNK_CHECKPOINT,
                "checkpoint_sha256": self.checkpoint_sha256,
                "inputs": ["embedding"] if self.has_encoders else ["obs"],
                "outputs": ["features"] if self.has_encoders else ["features", "obs_norm"],
                "architecture": self.trunk_architecture,
            },
            "feature_size": self.feature_size,
            "training": self.training,
        }
        if self.has_encoders:
            data["embedding_size"] = self.embedding_size
            data["encoders"] = self.encoders
        else:
            assert self.normalization is not None
            data["observation"] = {
                "size": self.observation_size,
                "normalization": self.normalization.to_json(),
            }
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str) -> Manifest:
        if data.get("format") != FORMAT_NAME:
            raise BundleError(f"{where}: not a polyhead bundle manifest (format {data.get('format')!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise BundleError(f"{where}: format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise UnsupportedBundleVersion(
                f"{where}: bundle format version {version} is newer than this polyhead "
                f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade polyhead"
            )
        try:
            trunk = data["trunk"]
            if version >= 2:
                embedding_size = int(data["embedding_size"])
                if embedding_size < 1:
                    raise ValueError(f"embedding_size must be positive, got {embedding_size}")
                encoders = dict(data.get("encoders", {}))
                observation_size, normalization = 0, None
            else:
                obs = data["observation"]
                embedding_size, encoders = 0, {}
                observation_size = int(obs["size"])
                normalization = Normalization.from_json(obs["normalization"])
            return cls(
                trunk_sha256=str(trunk["sha256"]),
                checkpoint_sha256=str(trunk.get("checkpoint_sha256", "")),
                observation_size=observation_size,
                embedding_size=embedding_size,
                encoders=encoders,
                feature_size=int(data["feature_size"]),
                normalization=normalization,
                suite=str(data.get("suite", "")),
                tasks=tuple(str(t) for t in data.get("tasks", [])),
                trunk_architecture=dict(trunk.get("architecture", {})),
                training=dict(data.get("training", {})),
                created_at=float(data.get("created_at", 0.0)),
                polyhead_version=str(data.get("polyhead_version", "")),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: malformed manifest: missing or invalid {exc}") from exc


@dataclass(frozen=True)
class HeadMeta:
    """What ``head.json`` records about one task version (its encoder and head).

    ``observation_size``: the width of the ``obs_norm`` the head may read: its encoder's input width
    (format 2), or the padded trunk input D (format 1). ``embedding_size`` > 0 marks a format-2 version:
    ``encoder`` then names its group and architecture and ``encoder_sha256`` the bytes of its
    ``encoder.onnx``.
    """

    task: TaskSpec
    observation_space: SpaceSpec
    action_space: SpaceSpec
    distribution: Distribution
    trunk_sha256: str
    feature_size: int
    observation_size: int
    inputs: tuple[str, ...] = ("features",)
    outputs: tuple[str, ...] = ("logits", "value")
    version: int = 0
    head_sha256: str = ""
    eval_return: float | None = None
    parent: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    embedding_size: int = 0
    encoder_sha256: str = ""
    encoder: dict[str, Any] = field(default_factory=dict)

    @property
    def has_encoder(self) -> bool:
        return self.embedding_size > 0

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.has_encoder:
            extra = {
                "embedding_size": self.embedding_size,
                "encoder_sha256": self.encoder_sha256,
                "encoder": self.encoder,
            }
        return {
            **extra,
            "format_version": 2 if self.has_encoder else 1,
            "task": self.task.to_json(),
            "version": self.version,
            "observation_space": space_to_json(self.observation_space),
            "action_space": space_to_json(self.action_space),
            "distribution": self.distribution,
            "trunk_sha256": self.trunk_sha256,
            "feature_size": self.feature_size,
            "observation_size": self.observation_size,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "head_sha256": self.head_sha256,
            "eval_return": _finite_or_none(self.eval_return),
            "parent": self.parent,
            "training": self.training,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str = "head metadata") -> HeadMeta:
        """Parse head.json; raises CorruptHead when fields are missing or malformed, and
        UnsupportedBundleVersion for a newer format."""
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise UnsupportedBundleVersion(
                f"{where}: head format version {version} is newer than this polyhead reads ({FORMAT_VERSION})"
            )
        try:
            distribution = data["distribution"]
            if distribution not in ("categorical", "gaussian"):
                raise ValueError(f"distribution must be 'categorical' or 'gaussian', got {distribution!r}")
            eval_return = data.get("eval_return")
            return cls(
                task=TaskSpec.from_json(data["task"], source=where),
                observation_space=space_from_json(data["observation_space"]),
                action_space=space_from_json(data["action_space"]),
                distribution=distribution,
                trunk_sha256=str(data["trunk_sha256"]),
                feature_size=int(data["feature_size"]),
                observation_size=int(data["observation_size"]),
                inputs=tuple(str(x) for x in data.get("inputs", ["features"])),
                outputs=tuple(str(x) for x in data.get("outputs", [])),
                version=int(data.get("version", 0)),
                head_sha256=str(data.get("head_sha256", "")),
                eval_return=None if eval_return is None else float(eval_return),
                parent=data.get("parent"),
                training=dict(data.get("training", {})),
                created_at=float(data.get("created_at", 0.0)),
                embedding_size=int(data.get("embedding_size", 0)),
                encoder_sha256=str(data.get("encoder_sha256", "")),
                encoder=dict(data.get("encoder", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptHead(f"{where}: malformed head metadata: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # InvalidTaskSpec / InvalidArgument from nested parsers
            raise CorruptHead(f"{where}: malformed head metadata: {exc}") from exc

    @classmethod
    def from_json_text(cls, text: str | bytes, *, where: str = "head metadata") -> HeadMeta:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptHead(f"{where}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise CorruptHead(f"{where}: must be a JSON object")
        return cls.from_json(data, where=where)

    def with_(self, **changes: Any) -> HeadMeta:
        from dataclasses import replace

        return replace(self, **changes)


def check_head_compatible(meta: HeadMeta, manifest: Manifest, *, trunk_sha256: str | None = None) -> None:
    """Raise IncompatibleHead unless the head was trained on this trunk and fits its shapes."""
    expected = trunk_sha256 or manifest.trunk_sha256
    if meta.trunk_sha256 != expected:
        raise IncompatibleHead(
            f"head for task {meta.task.id!r} was trained on trunk {meta.trunk_sha256[:12]}…, "
            f"but the serving trunk is {expected[:12]}…; retrain the head on this trunk or serve its bundle"
        )
    if meta.feature_size != manifest.feature_size:
        raise IncompatibleHead(
            f"head for task {meta.task.id!r} expects {meta.feature_size} trunk features; "
            f"the trunk produces {manifest.feature_size}"
        )
    if manifest.has_encoders or meta.has_encoder:
        if meta.embedding_size != manifest.embedding_size:
            have = f"an encoder into {meta.embedding_size} values" if meta.has_encoder else "no encoder"
            raise IncompatibleHead(
                f"version of task {meta.task.id!r} has {have}; the serving trunk (bundle format "
                f"{manifest.format_version}) takes "
                + (f"a {manifest.embedding_size}-value embedding" if manifest.has_encoders else "padded obs")
            )
        return
    if meta.observation_size != manifest.observation_size:
        raise IncompatibleHead(
            f"head for task {meta.task.id!r} expects trunk input size {meta.observation_size}; "
            f"the trunk takes {manifest.observation_size}"
        )
    from polyhead.spaces import observation_size

    if observation_size(meta.observation_space) > manifest.observation_size:
        raise IncompatibleHead(
            f"task {meta.task.id!r} observations have {observation_size(meta.observation_space)} values; "
            f"the trunk takes at most {manifest.observation_size}"
        )


@dataclass(frozen=True)
class HeadRecord:
    """One head version on disk."""

    task_id: str
    version: int
    path: Path
    meta: HeadMeta

    @property
    def onnx_path(self) -> Path:
        return self.path / HEAD_ONNX

    @property
    def encoder_path(self) -> Path:
        return self.path / ENCODER_ONNX

    def read_onnx(self, *, verify: bool = True) -> bytes:
        return _read_verified(self.onnx_path, self.meta.head_sha256 if verify else "")

    def read_encoder(self, *, verify: bool = True) -> bytes | None:
        """The version's ``encoder.onnx`` (None for a format-1 head); raises BundleNotFound when a format-2
        version lacks it, BundleIntegrityError when its bytes differ from the recorded sha256."""
        if not self.meta.has_encoder:
            return None
        try:
            return _read_verified(self.encoder_path, self.meta.encoder_sha256 if verify else "")
        except (FileNotFoundError, IsADirectoryError):
            raise BundleNotFound(
                f"{self.path}: {ENCODER_ONNX} is missing (head.json records an encoder)"
            ) from None


def _read_verified(path: Path, expected_sha256: str) -> bytes:
    data = path.read_bytes()
    if expected_sha256 and sha256_bytes(data) != expected_sha256:
        raise BundleIntegrityError(
            f"{path}: sha256 {sha256_bytes(data)[:12]}… differs from the recorded {expected_sha256[:12]}…"
        )
    return data


class Bundle:
    """A bundle directory opened for reading and for publishing head versions.

    ``Bundle.open`` verifies the manifest and the trunk's sha256. Head publication (``write_head``) and the
    active pointer (``set_active_version``) are atomic and safe against concurrent readers; concurrent
    *writers* of the same task must serialise (the online updater is the single writer per task).
    """

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    # --- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, *, verify: bool = True) -> Bundle:
        """Open a bundle; raise BundleNotFound, BundleError, UnsupportedBundleVersion or
        BundleIntegrityError (trunk hash mismatch when ``verify``)."""
        path = Path(root)
        if not path.is_dir():
            raise BundleNotFound(f"bundle directory {path} does not exist")
        manifest = Manifest.from_json(
            _read_json(path / MANIFEST, "bundle manifest"), where=str(path / MANIFEST)
        )
        bundle = cls(path, manifest)
        if not bundle.trunk_path.is_file():
            raise BundleNotFound(f"bundle {path}: trunk file {TRUNK_ONNX} is missing")
        if verify:
            actual = sha256_file(bundle.trunk_path)
            if actual != manifest.trunk_sha256:
                raise BundleIntegrityError(
                    f"bundle {path}: {TRUNK_ONNX} sha256 {actual[:12]}… differs from the manifest's "
                    f"{manifest.trunk_sha256[:12]}… (corrupt or replaced file)"
                )
        return bundle

    @property
    def trunk_path(self) -> Path:
        return self.root / TRUNK_ONNX

    @property
    def checkpoint_path(self) -> Path:
        return self.root / TRUNK_CHECKPOINT

    def verify_checkpoint(self) -> None:
        if not self.checkpoint_path.is_file():
            raise BundleNotFound(f"bundle {self.root}: trunk checkpoint {TRUNK_CHECKPOINT} is missing")
        actual = sha256_file(self.checkpoint_path)
        if self.manifest.checkpoint_sha256 and actual != self.manifest.checkpoint_sha256:
            raise BundleIntegrityError(
                f"bundle {self.root}: {TRUNK_CHECKPOINT} sha256 {actual[:12]}… differs from the manifest's"
            )

    # --- heads -----------------------------------------------------------------------------------------
    def task_dir(self, task_id: str) -> Path:
        return self.root / HEADS_DIR / task_id

    def task_ids(self) -> list[str]:
        # os.scandir, not Path.iterdir + is_dir: the directory entry's type needs no stat per task, and a
        # startup with 10,000 tasks lists this once.
        return sorted(
            entry.name for entry in _scandir(self.root / HEADS_DIR) if _is_dir(entry) and entry.name[0] != "."
        )

    def versions(self, task_id: str) -> list[int]:
        """Complete versions of a task on disk, ascending (temporary and malformed entries ignored)."""
        return sorted(
            v for v in _numbered_dirs(self.task_dir(task_id)) if _is_complete(self.root, task_id, v)
        )

    def has_version(self, task_id: str, version: int) -> bool:
        """Whether ``version`` is one of :meth:`versions`, with a few stats instead of a directory listing
        (a listing per head made startup quadratic-ish in versions and doubled its directory reads)."""
        return _is_complete(self.root, task_id, version)

    def head(self, task_id: str, version: int | None = None) -> HeadRecord:
        """A head version (default: the active one); raises UnknownTask, UnknownVersion, CorruptHead."""
        if version is None:
            version = self.active_version(task_id)
        elif not self.has_version(task_id, version):
            versions = self.versions(task_id)
            if not versions:
                raise UnknownTask(f"bundle {self.root} has no head for task {task_id!r}")
            raise UnknownVersion(
                f"task {task_id!r} has no version {version} in {self.root}; versions: {versions}"
            )
        path = self.task_dir(task_id) / str(version)
        meta = HeadMeta.from_json(_read_json(path / HEAD_JSON, "head metadata"), where=str(path / HEAD_JSON))
        return HeadRecord(task_id=task_id, version=version, path=path, meta=meta)

    def heads(self) -> Iterator[HeadRecord]:
        for task_id in self.task_ids():
            for version in self.versions(task_id):
                yield self.head(task_id, version)

    def active_version(self, task_id: str) -> int:
        """The version named by ``active.json``, else the highest complete version."""
        # No existence checks before the reads (a stat each): a startup calls this once per task.
        with contextlib.suppress(BundleError, KeyError, TypeError, ValueError, OSError):
            version = int(_read_json(self.task_dir(task_id) / ACTIVE_JSON, "active pointer")["version"])
            if self.has_version(task_id, version):
                return version
        for version in sorted(_numbered_dirs(self.task_dir(task_id)), reverse=True):
            if _is_complete(self.root, task_id, version):  # the highest complete one: usually the first
                return version
        raise UnknownTask(f"bundle {self.root} has no head for task {task_id!r}")

    def set_active_version(self, task_id: str, version: int) -> None:
        if version not in self.versions(task_id):
            raise UnknownVersion(f"task {task_id!r} has no version {version} in {self.root}")
        atomic_write_json(
            self.task_dir(task_id) / ACTIVE_JSON, {"version": version, "updated_at": time.time()}
        )

    def write_head(
        self,
        meta: HeadMeta,
        onnx_bytes: bytes,
        *,
        encoder: bytes | None = None,
        version: int | None = None,
        activate: bool = True,
    ) -> HeadRecord:
        """Publish a task version (its ``encoder`` and head, format 2; the head alone, format 1) atomically;
        returns its record.

        ``version`` None takes the next number after the highest complete version on disk, skipping
        numbers taken by incomplete version directories. Raises IncompatibleHead when the version does not
        fit this bundle's trunk (or lacks the encoder a format-2 bundle needs), VersionConflict when the
        version exists.
        """
        check_head_compatible(meta, self.manifest)
        if self.manifest.has_encoders != (encoder is not None):
            raise IncompatibleHead(
                f"task {meta.task.id!r}: a format-{self.manifest.format_version} bundle takes "
                + ("an encoder with every head" if self.manifest.has_encoders else "heads without encoders")
            )
        task_id = meta.task.id
        tdir = self.task_dir(task_id)
        tdir.mkdir(parents=True, exist_ok=True)
        if version is None:
            existing = self.versions(task_id)
            version = (existing[-1] + 1) if existing else 1
            # Skip a stray incomplete version directory (a partial copy, a foreign writer): it must not
            # turn every later publish into a VersionConflict.
            while (tdir / str(version)).exists():
                version += 1
        final = tdir / str(version)
        if final.exists():
            raise VersionConflict(f"task {task_id!r} version {version} already exists in {self.root}")
        meta = meta.with_(version=version, head_sha256=sha256_bytes(onnx_bytes))
        if encoder is not None:
            meta = meta.with_(encoder_sha256=sha256_bytes(encoder))
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=tdir))
        try:
            if encoder is not None:
                _write_file(tmp / ENCODER_ONNX, encoder)
            _write_file(tmp / HEAD_ONNX, onnx_bytes)
            _write_file(
                tmp / HEAD_JSON, (json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n").encode()
            )
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                raise VersionConflict(
                    f"task {task_id!r} version {version} appeared while writing: {exc}"
                ) from exc
            _fsync_dir(tdir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if activate:
            self.set_active_version(task_id, version)
        _remove_stale_temp_dirs(tdir)
        return HeadRecord(task_id=task_id, version=version, path=final, meta=meta)


def _remove_stale_temp_dirs(task_dir: Path, *, older_than_s: float = STALE_TEMP_S) -> list[Path]:
    """Delete what writers that died mid-publish left in a task directory: temporary ``.vN-*`` head
    directories and ``.active.json.*.tmp`` pointer files."""
    removed = []
    cutoff = time.time() - older_than_s
    for pattern in (".v*-*", f".{ACTIVE_JSON}.*.tmp"):
        for entry in task_dir.glob(pattern):
            with contextlib.suppress(OSError):  # another writer may remove it first
                if entry.stat().st_mtime < cutoff:
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed.append(entry)
    return removed


def write_bundle(
    out: str | Path,
    *,
    manifest: Manifest,
    trunk_onnx: bytes,
    checkpoint: bytes,
    heads: list[tuple[HeadMeta, bytes, bytes | None]],
    extra_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a complete bundle atomically: build it in a temporary sibling directory, then rename.

    ``heads``: (metadata, head bytes, encoder bytes or None for format 1) per task. The manifest's hashes
    are filled from the bytes given. ``overwrite`` replaces an existing bundle at
    ``out`` (the old one is renamed aside and deleted only after the new one is in place).
    Raises BundleError when ``out`` exists and ``overwrite`` is false.
    """
    from dataclasses import replace

    target = Path(out)
    if target.exists() and not overwrite and any(target.iterdir()):
        raise BundleError(
            f"{target} already exists and is not empty; choose another --out or pass --overwrite"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        trunk_sha = sha256_bytes(trunk_onnx)
        manifest = replace(manifest, trunk_sha256=trunk_sha, checkpoint_sha256=sha256_bytes(checkpoint))
        _write_file(tmp / TRUNK_ONNX, trunk_onnx)
        _write_file(tmp / TRUNK_CHECKPOINT, checkpoint)
        for rel, data in (extra_files or {}).items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_file(dest, data)
        staged = Bundle(tmp, manifest)
        for head_meta, onnx_bytes, encoder_bytes in heads:
            # Heads are exported before the trunk bytes' hash is known to the caller; bind them to it.
            bound = head_meta.with_(trunk_sha256=trunk_sha)
            staged.write_head(bound, onnx_bytes, encoder=encoder_bytes, version=bound.version or None)
        # The manifest goes last: a directory with a manifest is a complete bundle.
        _write_file(
            tmp / MANIFEST, (json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n").encode()
        )
        os.chmod(tmp, 0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.open(target)


def _complete_version_dir(path: Path) -> bool:
    """A published version: a numeric directory holding its metadata and graph (a temporary ``.v*``
    directory or a partial copy is not one)."""
    return _is_version_name(path.name) and (path / HEAD_JSON).is_file() and (path / HEAD_ONNX).is_file()


def _is_complete(root: Path, task_id: str, version: int) -> bool:
    """:func:`_complete_version_dir` of ``heads/<task_id>/<version>``, in strings (pathlib's joins were a
    fifth of a startup load per head)."""
    base = f"{root}/{HEADS_DIR}/{task_id}/{version}/"
    return os.path.isfile(base + HEAD_JSON) and os.path.isfile(base + HEAD_ONNX)


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # gone since the listing
        return False


def _numbered_dirs(path: Path) -> list[int]:
    """The numeric names under ``path``: candidate versions, whose completeness (and so being a
    directory) the caller checks (os.listdir: a third of scandir's cost for a task's few entries here)."""
    try:
        return [int(name) for name in os.listdir(path) if _is_version_name(name)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_version_name(name: str) -> bool:
    """A version directory's name: ASCII digits, no leading zero ("07" and "²" are not versions)."""
    return name.isascii() and name.isdigit() and str(int(name)) == name
