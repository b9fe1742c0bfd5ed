"""The head registry: versioned task adapters (encoder + head), loaded, validated and warmed up before
they serve.

A version of a task is its head and, from bundle format 2, its encoder: both are loaded, checked and
warmed up together and published in the one :class:`LoadedHead`, so a swap replaces a task's encoder and
head atomically. Byte-identical encoders (an encoder group's tasks) share one :class:`EncoderRuntime`.

Concurrency contract (the vLLM LoRA-manager / Ray Serve multiplex pattern):

* Readers never lock. The whole state is one immutable ``Mapping[str, TaskHeads]`` behind one reference;
  a request resolves its :class:`LoadedHead` once and keeps that object, so an in-flight request finishes
  on the head it started with even if the task is swapped or the version unloaded meanwhile.
* Writers (load, activate, unload) build the new head outside the lock (parse, validate, session, warm-up:
  the slow part), then take the one writer lock, re-check against the current state and publish a new
  mapping with one reference assignment. A failed load changes nothing.

Rules: the first version loaded for a task becomes active whatever ``activate`` says (a loaded task always
has a serving version); the active version cannot be unloaded alone (``ActiveVersionInUse``); a version
number loaded with other bytes is a ``VersionConflict``; the same bytes again is a no-op.

Bounded memory: at most ``max_loaded_versions`` versions of a task stay loaded (default 3: the active one,
the one it replaced, and the newest candidate; the canary too, when there is one). Loading one more unloads
the oldest version that is none of those; its files stay in the bundle (a later load or a bundle-pointer
change brings it back). An unloaded version stops being resolvable at once, and its session is freed when
the last in-flight request holding it finishes (readers keep their ``LoadedHead``; nothing else references
it).

Stable and canary labels: the active version is the task's *stable* version; a task may also have a
*canary*, another loaded version that takes ``canary_percent`` of the traffic (:meth:`TaskHeads.route`:
by a hash of the episode id, so every replica sends an episode to the same version, or per request when
there is no episode id). The canary is set, changed, promoted (it becomes stable) and cleared by writers
like any other change; it cannot be unloaded while it is the canary, and activating it promotes it.
Many heads: a head whose graph is a plain MLP runs from the server's stacked weight banks
(:mod:`polyhead.server.mlp_heads`; its bank slots, like a session, are freed when the last holder lets go),
any other head through its own onnxruntime session. A load costs the same whatever the number of loaded
heads: the state is a sharded immutable map (:class:`TaskMap`, one shard copied per change), listeners hear
which task changed, and shared encoders are found by sha256 in a weak index.
No grpc here: the servicers translate.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import heapq
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import onnxruntime as ort

from polyhead.bundle import (
    HEAD_JSON,
    HEAD_ONNX,
    HEADS_DIR,
    Bundle,
    HeadMeta,
    check_head_compatible,
    sha256_bytes,
)
from polyhead.errors import (
    ActiveVersionInUse,
    BundleNotFound,
    CanaryError,
    CorruptHead,
    IncompatibleHead,
    InvalidArgument,
    PolyheadError,
    UnknownTask,
    UnknownVersion,
    VersionConflict,
)
from polyhead.server.metrics import ServerMetrics
from polyhead.server.mlp_heads import HeadBanks, NotAnMlp, StackedHead, parse_mlp_head
from polyhead.server.runtime import EncoderRuntime, HeadRuntime, TrunkRuntime
from polyhead.spaces import observation_size

log = logging.getLogger(__name__)

SOURCES = ("bundle", "upload", "watch")


@dataclass(frozen=True, eq=False)
class LoadedHead:
    """One task version (encoder, format 2, and head) ready to serve. Immutable; compared by identity."""

    task_id: str
    version: int
    meta: HeadMeta
    runtime: HeadRuntime | StackedHead  # stacked: a plain-MLP head in the server's weight banks
    head_sha256: str
    loaded_at: float
    source: str
    encoder: EncoderRuntime | None = None

    @property
    def encoder_sha256(self) -> str:
        return "" if self.encoder is None else self.encoder.sha256

    @property
    def eval_return(self) -> float:
        return math.nan if self.meta.eval_return is None else float(self.meta.eval_return)


@dataclass(frozen=True)
class TaskHeads:
    """The loaded versions of one task and the one that serves."""

    task_id: str
    versions: Mapping[int, LoadedHead]
    active: int
    previous: int = 0  # the version active before ``active`` (kept loaded for a rollback), 0 if none
    canary: int = 0  # a loaded version other than ``active`` taking ``canary_percent`` of traffic; 0: none
    canary_percent: float = 0.0

    @property
    def active_head(self) -> LoadedHead:
        return self.versions[self.active]

    def route(self, episode_id: str, draw: Callable[[], float]) -> LoadedHead:
        """The head that serves a request without an explicit version: the canary for ``canary_percent``
        of traffic, else the stable (active) version.

        With an ``episode_id`` the choice is a hash of (task, episode id): the same on every call and every
        replica, so an episode stays on one version while the share is unchanged (and a widened share only
        moves stable episodes to the canary, never back). Without one, ``draw()`` (uniform in [0, 1)) decides
        per request.
        """
        if not self.canary or self.canary_percent <= 0.0:
            return self.versions[self.active]
        if episode_id:
            on_canary = canary_bucket(self.task_id, episode_id) < self.canary_percent * 100.0
        else:
            on_canary = draw() * 100.0 < self.canary_percent
        return self.versions[self.canary if on_canary else self.active]

    def head(self, version: int = 0) -> LoadedHead:
        """The active head (version 0) or a specific loaded version; raises UnknownVersion."""
        if version == 0:
            return self.versions[self.active]
        found = self.versions.get(version)
        if found is None:
            raise UnknownVersion(
                f"task {self.task_id!r} has no loaded version {version}; loaded: {sorted(self.versions)}"
            )
        return found


def canary_bucket(task_id: str, episode_id: str) -> int:
    """The episode's bucket in 0..9999 (a canary at p percent takes buckets below 100 p): the first 8 bytes
    of blake2b(task, episode id), so it is uniform for any id scheme and the same on every replica."""
    digest = hashlib.blake2b(f"{task_id}\x00{episode_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 10_000


@dataclass(frozen=True)
class LoadResult:
    head: LoadedHead
    active_version: int
    load_seconds: float
    already_loaded: bool


@dataclass(frozen=True)
class SwapResult:
    previous_version: int
    active_version: int
    swap_seconds: float


Listener = Callable[[Mapping[str, TaskHeads], str], None]

_SHARDS = 128


class TaskMap(Mapping[str, TaskHeads]):
    """An immutable task -> :class:`TaskHeads` mapping whose one-task update copies only a shard.

    Copying a flat dict on every publish made loading n heads O(n²) (10,000 heads: 50 million entry
    copies); with 128 shards an update copies about n/128 entries and the 128-slot tuple.
    """

    __slots__ = ("_len", "_shards")

    def __init__(self, shards: tuple[Mapping[str, TaskHeads], ...] | None = None, length: int = 0) -> None:
        self._shards = shards if shards is not None else (MappingProxyType({}),) * _SHARDS
        self._len = length

    def with_entry(self, task_id: str, entry: TaskHeads | None) -> TaskMap:
        """A new map with ``task_id`` set to ``entry`` (None: removed)."""
        k = hash(task_id) % _SHARDS
        shard = dict(self._shards[k])
        had = task_id in shard
        if entry is None:
            shard.pop(task_id, None)
        else:
            shard[task_id] = entry
        length = self._len + (entry is not None) - had
        return TaskMap((*self._shards[:k], MappingProxyType(shard), *self._shards[k + 1 :]), length)

    def __getitem__(self, task_id: str) -> TaskHeads:
        return self._shards[hash(task_id) % _SHARDS][task_id]

    def get(self, task_id: str, default: TaskHeads | None = None) -> TaskHeads | None:  # type: ignore[override]
        return self._shards[hash(task_id) % _SHARDS].get(task_id, default)

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, str) and task_id in self._shards[hash(task_id) % _SHARDS]

    def __iter__(self) -> Iterator[str]:
        for shard in self._shards:
            yield from shard

    def __len__(self) -> int:
        return self._len


def _check_share(percent: float) -> None:
    if not (0.0 <= percent <= 100.0) or math.isnan(percent):
        raise InvalidArgument(f"canary_percent must be within 0..100, got {percent}")


_gc_lock = threading.Lock()
_gc_pausers = 0


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a block loads heads (it was a fifth of a bulk load: every
    collection rescanned what the loads before had built). Nested and concurrent blocks are counted, so
    the collector comes back on when the last one ends, and garbage made meanwhile goes at its next
    collection. A pause leaves the collector off if it was off when the first pause began."""
    global _gc_pausers
    with _gc_lock:
        if _gc_pausers == 0 and not gc.isenabled():  # someone else turned it off: leave it to them
            paused = False
        else:
            paused = True
            _gc_pausers += 1
            gc.disable()
    try:
        yield
    finally:
        if paused:
            with _gc_lock:
                _gc_pausers -= 1
                if _gc_pausers == 0:
                    gc.enable()


class HeadRegistry:
    """Versioned heads per task on one trunk. Thread-safe: call writers from any thread."""

    def __init__(
        self,
        bundle: Bundle,
        trunk: TrunkRuntime,
        *,
        session_options: ort.SessionOptions,
        warmup_batch_sizes: tuple[int, ...],
        metrics: ServerMetrics,
        max_head_bytes: int | None = None,
        max_loaded_versions: int = 3,
        stacked_heads: bool = True,
    ) -> None:
        """``stacked_heads``: run heads whose graphs are plain MLPs from stacked weight banks
        (:mod:`polyhead.server.mlp_heads`); False: every head gets its own onnxruntime session."""
        if max_loaded_versions < 1:
            raise ValueError(f"max_loaded_versions must be at least 1, got {max_loaded_versions}")
        self.bundle = bundle
        self.max_head_bytes = max_head_bytes
        self.max_loaded_versions = max_loaded_versions
        self.trunk = trunk
        self.manifest = bundle.manifest
        self._opts = session_options
        self._warmup = warmup_batch_sizes
        self._metrics = metrics
        self._lock = threading.Lock()
        self._tasks = TaskMap()
        self.banks: HeadBanks | None = HeadBanks() if stacked_heads else None
        # Loaded encoders by sha256 (weak: an encoder lives as long as a version that runs it).
        self._encoders: weakref.WeakValueDictionary[str, EncoderRuntime] = weakref.WeakValueDictionary()
        self._activations: dict[str, int] = {}  # per task: changes of the active version (or presence)
        self._served: dict[str, frozenset[int]] = {}  # per task: every version ever loaded here
        self._listeners: list[Listener] = []

    # --- readers (lock-free) ---------------------------------------------------------------------------
    @property
    def tasks(self) -> Mapping[str, TaskHeads]:
        """The current state: an immutable snapshot."""
        return self._tasks

    def resolve(self, task_id: str, version: int = 0) -> LoadedHead:
        """The head that serves ``task_id`` (or a given loaded version); raises UnknownTask/UnknownVersion."""
        entry = self._tasks.get(task_id)
        if entry is None:
            raise self._unknown(task_id)
        return entry.head(version)

    def served_versions(self, task_id: str) -> frozenset[int]:
        """Every version of ``task_id`` this server has loaded (and so may have served), unloaded ones too:
        experience acted by any of them may still arrive."""
        return self._served.get(task_id, frozenset())

    def activations(self, task_id: str) -> int:
        """How often ``task_id``'s active version has changed (or the task appeared or went) so far.

        Read it before deciding on a swap and pass ``still_wanted`` to :meth:`set_active_if` to swap only
        when no other writer has activated anything for the task meanwhile.
        """
        return self._activations.get(task_id, 0)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(snapshot, task_id)`` after every change to ``task_id`` (from the writer's
        thread)."""
        self._listeners.append(listener)

    # --- loading ---------------------------------------------------------------------------------------
    def load_bundle_heads(self) -> list[LoadResult]:
        """Load the active version of every task in the bundle (startup). A head that fails is logged
        and counted, and the others still load."""
        results = []
        for task_id in self.bundle.task_ids():
            try:
                version = self.bundle.active_version(task_id)
                results.append(self.load_from_bundle(task_id, version, activate=True, source="bundle"))
            except PolyheadError as exc:
                log.error("task %s: head not loaded: %s: %s", task_id, type(exc).__name__, exc)
        return results

    def load_from_bundle(
        self, task_id: str, version: int, *, activate: bool, source: str = "bundle"
    ) -> LoadResult:
        """Load ``heads/<task_id>/<version>`` of the serving bundle."""
        t0 = time.perf_counter()
        try:
            if version <= 0:
                raise InvalidArgument(f"a bundle head version is a positive integer, got {version}")
            record = self.bundle.head(task_id, version)
            onnx_bytes = record.read_onnx(verify=True)
            encoder = record.read_encoder(verify=True)
            return self._load(
                task_id,
                onnx_bytes,
                record.meta,
                encoder=encoder,
                version=version,
                activate=activate,
                source=source,
                t0=t0,
            )
        except PolyheadError as exc:
            self._metrics.head_load_failures.labels(task=task_id, reason=type(exc).__name__).inc()
            raise

    def load_from_path(
        self, task_id: str, repository_path: str, *, version: int, activate: bool
    ) -> LoadResult:
        """Load a head directory named relative to the bundle root (``heads/<task>/<version>``)."""
        try:
            if not repository_path or "\x00" in repository_path or len(repository_path) > 4096:
                raise InvalidArgument(
                    "repository_path must be a non-empty path of at most 4096 characters without NUL bytes, "
                    f"relative to the bundle root ({HEADS_DIR}/<task>/<version>); "
                    f"got {repository_path[:80]!r}"
                )
            root = self.bundle.root.resolve()
            try:
                path = (root / repository_path).resolve()
            except (OSError, ValueError) as exc:
                raise InvalidArgument(
                    f"repository_path {repository_path[:80]!r} is not a usable path: {exc}"
                ) from exc
            if not path.is_relative_to(root / HEADS_DIR):
                raise InvalidArgument(
                    f"repository_path {repository_path!r} is outside the bundle's {HEADS_DIR}/ directory"
                )
            if not (path / HEAD_ONNX).is_file() or not (path / HEAD_JSON).is_file():
                raise BundleNotFound(f"no head at {repository_path!r} in bundle {self.bundle.root}")
            rel = path.relative_to(root / HEADS_DIR).parts
            if len(rel) != 2 or not rel[1].isdigit():
                raise InvalidArgument(
                    f"repository_path {repository_path!r} must name {HEADS_DIR}/<task>/<version>"
                )
            if rel[0] != task_id:
                raise InvalidArgument(
                    f"repository_path {repository_path!r} is not a head of task {task_id!r}"
                )
            if version not in (0, int(rel[1])):
                raise InvalidArgument(f"version {version} differs from the path's version {rel[1]}")
        except PolyheadError as exc:
            self._metrics.head_load_failures.labels(task=task_id, reason=type(exc).__name__).inc()
            raise
        return self.load_from_bundle(task_id, int(rel[1]), activate=activate, source="bundle")

    def load_from_bytes(
        self,
        task_id: str,
        onnx_bytes: bytes,
        head_json: str,
        *,
        encoder: bytes = b"",
        version: int = 0,
        activate: bool = True,
    ) -> LoadResult:
        """Load uploaded ``head.onnx`` bytes (and, format 2, ``encoder.onnx`` bytes) described by
        ``head_json``; version 0 takes the next number after the highest loaded or on disk.

        Format 2 without ``encoder`` bytes: the version reuses the loaded encoder whose sha256 head.json
        names in ``encoder_sha256`` (a new head on a shared, frozen encoder uploads no encoder bytes);
        InvalidArgument when no loaded version holds it."""
        t0 = time.perf_counter()
        try:
            if not onnx_bytes:
                raise InvalidArgument("LoadHead needs head ONNX bytes or a repository_path")
            size = len(onnx_bytes) + len(encoder) + len(head_json.encode())
            if self.max_head_bytes is not None and size > self.max_head_bytes:
                # Checked before parsing: an oversize upload costs no onnxruntime session.
                raise InvalidArgument(
                    f"uploaded head of task {task_id!r} is {size} bytes (onnx + encoder + head_json); "
                    f"this server accepts at most {self.max_head_bytes} (setting max_head_bytes)"
                )
            if not head_json:
                raise InvalidArgument(
                    "LoadHead with ONNX bytes needs head_json (the head.json of the bundle)"
                )
            if version < 0:
                raise InvalidArgument(f"version must be 0 (next) or positive, got {version}")
            meta = HeadMeta.from_json_text(head_json, where=f"head_json of task {task_id!r}")
            return self._load(
                task_id,
                onnx_bytes,
                meta,
                encoder=encoder or None,
                version=version,
                activate=activate,
                source="upload",
                t0=t0,
            )
        except PolyheadError as exc:
            self._metrics.head_load_failures.labels(task=task_id, reason=type(exc).__name__).inc()
            raise

    def _next_version(self, task_id: str) -> int:
        loaded = max(self._tasks[task_id].versions, default=0) if task_id in self._tasks else 0
        on_disk = max(self.bundle.versions(task_id), default=0)
        return max(loaded, on_disk) + 1

    def _check_meta(self, task_id: str, meta: HeadMeta, sha: str, encoder_sha: str) -> None:
        if meta.task.id != task_id:
            raise InvalidArgument(f"head metadata describes task {meta.task.id!r}, not {task_id!r}")
        if meta.head_sha256 and meta.head_sha256 != sha:
            raise CorruptHead(
                f"head bytes of task {task_id!r} have sha256 {sha[:12]}…; head.json records "
                f"{meta.head_sha256[:12]}…"
            )
        check_head_compatible(meta, self.manifest)
        if self.manifest.has_encoders and not encoder_sha:
            raise InvalidArgument(
                f"version of task {task_id!r} has no encoder; this server's bundle (format "
                f"{self.manifest.format_version}) needs each task's encoder.onnx with its head"
            )
        if encoder_sha and not self.manifest.has_encoders:
            raise IncompatibleHead(
                f"version of task {task_id!r} brings an encoder; this server's trunk (bundle format 1) "
                "takes padded observations"
            )
        if meta.encoder_sha256 and encoder_sha and meta.encoder_sha256 != encoder_sha:
            raise CorruptHead(
                f"encoder bytes of task {task_id!r} have sha256 {encoder_sha[:12]}…; head.json records "
                f"{meta.encoder_sha256[:12]}…"
            )
        entry = self._tasks.get(task_id)
        if entry is not None:
            served = entry.active_head.meta
            if (served.action_space, served.distribution) != (meta.action_space, meta.distribution):
                raise IncompatibleHead(
                    f"head for task {task_id!r} acts in {meta.action_space} ({meta.distribution}); the "
                    f"task is served in {served.action_space} ({served.distribution})"
                )
            if served.observation_space != meta.observation_space:
                raise IncompatibleHead(
                    f"head for task {task_id!r} observes {meta.observation_space}; the task is served "
                    f"with {served.observation_space}"
                )

    def _loaded_encoder(self, sha: str) -> EncoderRuntime | None:
        return self._encoders.get(sha)

    def _encoder_runtime(self, task_id: str, model: bytes | None, sha: str, meta: HeadMeta) -> EncoderRuntime:
        """The loaded runtime of byte-identical encoder bytes if any version serves them, else a new one
        from ``model``, warmed up on the task's own observation width."""
        loaded = self._loaded_encoder(sha)
        if loaded is not None:
            return loaded
        if model is None:
            raise InvalidArgument(
                f"version of task {task_id!r} names encoder sha256 {sha[:12]}… without its bytes, and no "
                "loaded version has that encoder; upload encoder_onnx with the head"
            )
        runtime = EncoderRuntime(
            model, task_id=task_id, sha256=sha, embedding_size=self.manifest.embedding_size, opts=self._opts
        )
        runtime.warm_up(
            self._warmup,
            task_id=task_id,
            width=observation_size(meta.observation_space),
            norm_width=meta.observation_size,
        )
        self._encoders.setdefault(sha, runtime)
        return runtime

    def _head_runtime(self, onnx_bytes: bytes, meta: HeadMeta) -> HeadRuntime | StackedHead:
        """Stacked weights when the graph is a plain MLP (and stacking is on), else an onnxruntime session;
        either checked and warmed up. Raises CorruptHead / IncompatibleHead."""
        runtime: HeadRuntime | StackedHead
        if self.banks is not None:
            try:
                parsed = parse_mlp_head(onnx_bytes, meta)
            except NotAnMlp as exc:
                log.debug("task %s: head runs in onnxruntime (%s)", meta.task.id, exc)
            else:
                runtime = self.banks.stack(parsed, meta, feature_size=self.manifest.feature_size)
                runtime.warm_up(self._warmup, meta.observation_size)
                return runtime
        runtime = HeadRuntime(onnx_bytes, meta, feature_size=self.manifest.feature_size, opts=self._opts)
        runtime.warm_up(self._warmup, meta.observation_size)
        return runtime

    def _load(
        self,
        task_id: str,
        onnx_bytes: bytes,
        meta: HeadMeta,
        *,
        encoder: bytes | None,
        version: int,
        activate: bool,
        source: str,
        t0: float,
    ) -> LoadResult:
        sha = sha256_bytes(onnx_bytes)
        if encoder is not None:
            encoder_sha = sha256_bytes(encoder)
        else:  # by reference (format 2): an encoder this server already runs
            encoder_sha = meta.encoder_sha256 if self.manifest.has_encoders else ""
        self._check_meta(task_id, meta, sha, encoder_sha)
        existing = self._tasks.get(task_id)
        if version and existing is not None and version in existing.versions:
            same = existing.versions[version]
            if (same.head_sha256, same.encoder_sha256) != (sha, encoder_sha):
                raise VersionConflict(
                    f"task {task_id!r} version {version} is loaded with other bytes (head sha256 "
                    f"{same.head_sha256[:12]}…); load it as a new version"
                )
            active = self.set_active(task_id, version).active_version if activate else existing.active
            return LoadResult(same, active, time.perf_counter() - t0, already_loaded=True)
        encoder_runtime = self._encoder_runtime(task_id, encoder, encoder_sha, meta) if encoder_sha else None
        runtime = self._head_runtime(onnx_bytes, meta)
        with self._lock:
            # Re-check: another writer may have loaded this version or changed the task meanwhile.
            self._check_meta(task_id, meta, sha, encoder_sha)
            number = version or self._next_version(task_id)
            entry = self._tasks.get(task_id)
            concurrent = entry.versions.get(number) if entry is not None else None
            current_active = entry.active if entry is not None else 0
            if concurrent is None:
                head = LoadedHead(
                    task_id=task_id,
                    version=number,
                    meta=replace(meta, version=number, head_sha256=sha),
                    runtime=runtime,
                    head_sha256=sha,
                    loaded_at=time.time(),
                    source=source,
                    encoder=encoder_runtime,
                )
                t_swap = time.perf_counter()
                versions = dict(entry.versions) if entry is not None else {}
                versions[number] = head
                active = number if (activate or entry is None) else entry.active
                previous = (entry.active if active != entry.active else entry.previous) if entry else 0
                canary = entry.canary if entry is not None and entry.canary != active else 0
                unloaded = self._bound(versions, keep={active, previous, number, canary})
                self._publish(
                    task_id,
                    _with_canary(entry, TaskHeads(task_id, MappingProxyType(versions), active, previous)),
                )
                if encoder_runtime is not None:
                    self._encoders.setdefault(encoder_runtime.sha256, encoder_runtime)
                swap_seconds = time.perf_counter() - t_swap
            elif not version or (concurrent.head_sha256, concurrent.encoder_sha256) != (sha, encoder_sha):
                raise VersionConflict(
                    f"task {task_id!r} version {number} was loaded concurrently with other bytes"
                )
        if concurrent is not None:
            # Another writer (the bundle watch) loaded these very bytes while we warmed up: the load is
            # done, and activating it is all that may be left.
            active = self.set_active(task_id, number).active_version if activate else current_active
            return LoadResult(concurrent, active, time.perf_counter() - t0, already_loaded=True)
        seconds = time.perf_counter() - t0
        self._metrics.head_loads.labels(task=task_id, source=source).inc()
        self._metrics.head_load_seconds.labels(task=task_id).observe(seconds)
        if entry is None or active != entry.active:
            self._metrics.head_swaps.labels(task=task_id).inc()
            self._metrics.head_swap_seconds.labels(task=task_id).observe(swap_seconds)
        log.info(
            "task %s: loaded version %d from %s in %.1f ms (active %d)%s",
            task_id,
            number,
            source,
            seconds * 1e3,
            active,
            f"; unloaded {unloaded} (at most {self.max_loaded_versions} loaded, files stay on disk)"
            if unloaded
            else "",
        )
        self._notify(task_id)
        return LoadResult(head, active, seconds, already_loaded=False)

    # --- activation and unloading ----------------------------------------------------------------------
    def set_active(self, task_id: str, version: int) -> SwapResult:
        """Serve another loaded version: one reference swap. Raises UnknownTask/UnknownVersion."""
        result = self._swap(task_id, version, still_wanted=None)
        assert result is not None
        return result

    def set_active_if(
        self, task_id: str, version: int, still_wanted: Callable[[], bool]
    ) -> SwapResult | None:
        """Like :meth:`set_active`, but only when ``still_wanted()`` holds under the writer lock.

        ``still_wanted`` runs with the lock held, so it must be quick and in memory (no disk or network):
        typically ``lambda: registry.activations(task) == seen``. The bundle watch uses it so that an
        activation another writer made after the watch read the bundle's pointer (an updater rolling back:
        bundle pointer first, then ``SetActiveVersion``) is never overwritten by that stale pointer.
        Returns None when the swap was no longer wanted.
        """
        return self._swap(task_id, version, still_wanted=still_wanted)

    def _swap(
        self, task_id: str, version: int, *, still_wanted: Callable[[], bool] | None
    ) -> SwapResult | None:
        t0 = time.perf_counter()
        with self._lock:
            entry = self._tasks.get(task_id)
            if entry is None:
                raise self._unknown(task_id)
            if version not in entry.versions:
                raise UnknownVersion(
                    f"task {task_id!r} has no loaded version {version}; loaded: {sorted(entry.versions)}"
                )
            if still_wanted is not None and not still_wanted():
                return None
            previous = entry.active
            if version != previous:
                # Activating the canary promotes it: it is no longer a canary of itself.
                self._publish(task_id, _with_canary(entry, replace(entry, active=version, previous=previous)))
            seconds = time.perf_counter() - t0
        if version != previous:
            self._metrics.head_swaps.labels(task=task_id).inc()
            self._metrics.head_swap_seconds.labels(task=task_id).observe(seconds)
            self._notify(task_id)
        return SwapResult(previous, version, seconds)

    def unload(self, task_id: str, version: int = 0, *, all_versions: bool = False) -> list[int]:
        """Unload a staged version, or every version of the task (it stops being served)."""
        with self._lock:
            entry = self._tasks.get(task_id)
            if entry is None:
                raise self._unknown(task_id)
            if all_versions:
                removed = sorted(entry.versions)
                self._publish(task_id, None)
            else:
                if version not in entry.versions:
                    raise UnknownVersion(
                        f"task {task_id!r} has no loaded version {version}; loaded: {sorted(entry.versions)}"
                    )
                if version == entry.active:
                    raise ActiveVersionInUse(
                        f"version {version} serves task {task_id!r}; activate another version first or "
                        "unload all_versions"
                    )
                if version == entry.canary:
                    raise ActiveVersionInUse(
                        f"version {version} is the canary of task {task_id!r} "
                        f"({entry.canary_percent:g}% of traffic); clear the canary first"
                    )
                versions = {v: h for v, h in entry.versions.items() if v != version}
                self._publish(task_id, replace(entry, versions=MappingProxyType(versions)))
                removed = [version]
        self._notify(task_id)
        return removed

    # --- canary ----------------------------------------------------------------------------------------
    def set_canary(self, task_id: str, version: int, percent: float) -> TaskHeads:
        """Make loaded ``version`` the task's canary at ``percent`` (0..100) of traffic, or change the share
        of the current canary. Raises UnknownTask, UnknownVersion, CanaryError (the stable version, or a
        share outside 0..100)."""
        _check_share(percent)
        with self._lock:
            entry = self._entry(task_id)
            if version not in entry.versions:
                raise UnknownVersion(
                    f"task {task_id!r} has no loaded version {version} to make canary; loaded: "
                    f"{sorted(entry.versions)} (load it with activate=false first)"
                )
            if version == entry.active:
                raise CanaryError(
                    f"version {version} is the stable version of task {task_id!r}; a canary is another "
                    "loaded version"
                )
            updated = replace(entry, canary=version, canary_percent=float(percent))
            self._publish(task_id, updated)
        log.info("task %s: canary version %d at %g%% (stable %d)", task_id, version, percent, entry.active)
        self._notify(task_id)
        return updated

    def check_canary_load(self, task_id: str, percent: float) -> None:
        """Refuse, before anything loads, a load that is to become ``task_id``'s canary at ``percent`` when
        it could not: a share outside 0..100, or a task with no stable version yet (its first version
        always serves). Raises InvalidArgument, CanaryError."""
        _check_share(percent)
        if task_id not in self._tasks:
            raise CanaryError(
                f"task {task_id!r} is not served yet: its first version becomes the stable one, not a "
                "canary; load it without canary_percent first"
            )

    def promote_canary(self, task_id: str, version: int = 0) -> SwapResult:
        """The canary becomes the stable version (one reference swap); ``version`` (if not 0) must name the
        current canary, so a controller acting on stale state promotes nothing. Raises UnknownTask,
        CanaryError (no canary, or another one)."""
        entry = self._entry(task_id)
        if not entry.canary or (version and version != entry.canary):
            raise CanaryError(
                f"task {task_id!r} has "
                + (f"canary version {entry.canary}" if entry.canary else "no canary")
                + (f", not version {version}" if version else "")
                + "; nothing promoted"
            )
        result = self._swap(
            task_id, entry.canary, still_wanted=lambda: self._tasks[task_id].canary == entry.canary
        )
        if result is None:
            raise CanaryError(f"the canary of task {task_id!r} changed while promoting; nothing promoted")
        return result

    def clear_canary(self, task_id: str) -> int:
        """Send all traffic to the stable version again; returns the cleared canary version (0: none).
        The version stays loaded. Raises UnknownTask."""
        with self._lock:
            entry = self._entry(task_id)
            cleared = entry.canary
            if cleared:
                self._publish(task_id, replace(entry, canary=0, canary_percent=0.0))
        if cleared:
            log.info("task %s: canary version %d cleared (stable %d)", task_id, cleared, entry.active)
            self._notify(task_id)
        return cleared

    # --- internals ---------------------------------------------------------------------------------------
    def _unknown(self, task_id: str) -> UnknownTask:
        """UnknownTask naming at most 20 served tasks (a server may serve 10,000)."""
        first = heapq.nsmallest(20, self._tasks)
        more = f" and {len(self._tasks) - len(first)} more" if len(self._tasks) > len(first) else ""
        return UnknownTask(f"unknown task {task_id!r}; served tasks: {first}{more}")

    def _entry(self, task_id: str) -> TaskHeads:
        entry = self._tasks.get(task_id)
        if entry is None:
            raise self._unknown(task_id)
        return entry

    def _bound(self, versions: dict[int, LoadedHead], *, keep: set[int]) -> list[int]:
        """Drop the oldest versions beyond ``max_loaded_versions`` that are not in ``keep`` (in place)."""
        removed: list[int] = []
        for version in sorted(versions):
            if len(versions) <= self.max_loaded_versions:
                break
            if version not in keep:
                del versions[version]
                removed.append(version)
        return removed

    def _publish(self, task_id: str, entry: TaskHeads | None) -> None:
        """Replace the state with one reference assignment (call with the lock held)."""
        previous = self._tasks.get(task_id)
        if previous is None or entry is None or previous.active != entry.active:
            self._activations[task_id] = self._activations.get(task_id, 0) + 1
        if entry is None:
            for gauge in (
                self._metrics.active_head_version,
                self._metrics.canary_version,
                self._metrics.canary_percent,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(task_id)
            self._metrics.loaded_heads.labels(task=task_id).set(0)
        else:
            if previous is None:
                self._metrics.init_task(task_id)
            self._served[task_id] = self._served.get(task_id, frozenset()) | frozenset(entry.versions)
            self._metrics.active_head_version.labels(task=task_id).set(entry.active)
            self._metrics.canary_version.labels(task=task_id).set(entry.canary)
            self._metrics.canary_percent.labels(task=task_id).set(entry.canary_percent)
            self._metrics.loaded_heads.labels(task=task_id).set(len(entry.versions))
        self._tasks = self._tasks.with_entry(task_id, entry)

    def _notify(self, task_id: str) -> None:
        snapshot = self._tasks
        for listener in self._listeners:
            try:
                listener(snapshot, task_id)
            except Exception:  # a listener's bug must not fail the load that already succeeded
                log.exception("registry listener failed")


def _with_canary(before: TaskHeads | None, after: TaskHeads) -> TaskHeads:
    """``after`` keeping ``before``'s canary unless the canary became the active version (promoted)."""
    if before is None or not before.canary or before.canary == after.active:
        return replace(after, canary=0, canary_percent=0.0)
    return replace(after, canary=before.canary, canary_percent=before.canary_percent)
