"""The three servers of the comparison, each in its own venv under ``benchmarks/peers/.venvs/``, and the
per-protocol adapters the load generator uses to talk to them.

* venvs: :func:`ensure_venv` builds a venv from a pip argument list the first time (and whenever the list
  changes: a marker file holds its hash) and reuses it after that. A failed build raises
  :class:`VenvError` with the pip log's tail and the log's path; the half-built venv is removed.
* servers: :func:`start` runs one server as its own process group (``start_new_session``) on 127.0.0.1
  ports picked here, waits until one inference succeeds (the start time), and yields a
  :class:`RunningServer`; leaving the block sends SIGTERM to the group, then SIGKILL to the group and to
  every process of the tree seen before the stop (Ray's daemons included).
* CPU: :meth:`RunningServer.cpu_seconds` sums user + system time from ``/proc`` over the server process
  and all its descendants (MLServer's inference worker, Ray's GCS, raylet, proxy and replica actors).
* protocols: polyhead ``PolicyService.Act`` and Ray (the same ``polyhead.v1`` wire format, Ray routes it
  by the ``application`` metadata), MLServer's V2 ``ModelInfer`` (messages built from the descriptor that
  MLServer itself ships, so no hand-written copy of the V2 proto), and polyhead's ``Diagnostics.Echo``.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from polyhead.tensors import from_proto, to_proto
from polyhead.v1 import policy_pb2

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENVS = HERE / ".venvs"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
RAY_APP = "policy"
RAY_TUNED_APP = "policy-tuned"


# --- venvs --------------------------------------------------------------------------------------------------
class VenvError(RuntimeError):
    """A peer's venv could not be built (the message names the pip log)."""


@dataclass(frozen=True)
class Venv:
    name: str
    path: Path
    build_s: float | None  # None: reused from an earlier run

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name


def venv_specs() -> dict[str, list[str]]:
    """The pip arguments of each venv. polyhead is installed editable with its ``serve`` extra only (the
    serving image's set: no torch), so it runs the checkout's code."""
    return {
        "polyhead": ["-e", f"{REPO}[serve]"],
        "mlserver": ["-r", str(HERE / "requirements-mlserver.txt")],
        "ray": ["-r", str(HERE / "requirements-ray.txt")],
    }


def _spec_hash(args: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps(list(args)).encode())
    for i, arg in enumerate(args):
        if i and args[i - 1] == "-r":
            h.update(Path(arg).read_bytes())
    return h.hexdigest()


def ensure_venv(name: str, pip_args: Sequence[str], *, rebuild: bool = False, log: Any = print) -> Venv:
    """The venv ``.venvs/<name>``, built with ``pip install <pip_args>`` unless an identical build exists."""
    path = VENVS / name
    marker = path / ".polyhead-peers-spec"
    digest = _spec_hash(pip_args)
    if not rebuild and marker.is_file() and marker.read_text() == digest and (path / "bin/python").exists():
        return Venv(name, path, None)
    VENVS.mkdir(parents=True, exist_ok=True)
    pip_log = VENVS / f"{name}.install.log"
    log(f"building venv {path} (pip install {' '.join(pip_args)}); log: {pip_log}")
    started = time.monotonic()
    try:
        with pip_log.open("w") as out:
            subprocess.run(
                [sys.executable, "-m", "venv", "--clear", str(path)], check=True, stdout=out, stderr=out
            )
            subprocess.run(
                [str(path / "bin/pip"), "install", "--no-input", *pip_args],
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=HERE,
            )
    except subprocess.CalledProcessError as exc:
        tail = "\n".join(pip_log.read_text(errors="replace").splitlines()[-15:])
        shutil.rmtree(path, ignore_errors=True)
        raise VenvError(f"venv {name!r} failed to build ({exc}); see {pip_log}. Last lines:\n{tail}") from exc
    marker.write_text(digest)
    return Venv(name, path, time.monotonic() - started)


def du_bytes(*paths: Path) -> int:
    """Disk usage (``du -sb``) of the paths together, bytes."""
    out = subprocess.run(["du", "-scb", *map(str, paths)], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def compile_ray_stubs(ray: Venv, out: Path) -> Path:
    """``polyhead.v1`` types + policy stubs compiled by the Ray venv's own grpc_tools (Ray's gRPC proxy
    imports the servicer function of the service it proxies)."""
    out.mkdir(parents=True, exist_ok=True)
    protos = [REPO / "proto/polyhead/v1/types.proto", REPO / "proto/polyhead/v1/policy.proto"]
    subprocess.run(
        [str(ray.python), "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}", f"--python_out={out}",
         f"--grpc_python_out={out}", *map(str, protos)],
        check=True,
    )  # fmt: skip
    return out


# --- processes ----------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of the processes (those that exited are skipped)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat (busy excludes idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- protocols ----------------------------------------------------------------------------------------------
class Protocol:
    """How to ask one server for actions: method path, metadata, request bytes, actions from a response."""

    method: str
    metadata: tuple[tuple[str, str], ...] = ()

    def request(self, obs: npt.NDArray[np.float32]) -> bytes:
        raise NotImplementedError

    def actions(self, response: bytes) -> npt.NDArray[np.int64]:
        raise NotImplementedError


class PolicyAct(Protocol):
    """``polyhead.v1.PolicyService/Act``, deterministic (what the fused model computes)."""

    method = "/polyhead.v1.PolicyService/Act"

    def __init__(self, task: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.task = task
        self.metadata = metadata

    def request(self, obs: npt.NDArray[np.float32]) -> bytes:
        req = policy_pb2.ActRequest(task_id=self.task, observations=to_proto(obs), deterministic=True)
        return req.SerializeToString()

    def actions(self, response: bytes) -> npt.NDArray[np.int64]:
        return np.asarray(from_proto(policy_pb2.ActResponse.FromString(response).actions), np.int64)


class Echo(Protocol):
    """``polyhead.v1.Diagnostics/Echo`` with a payload as large as the Act request it stands beside."""

    method = "/polyhead.v1.Diagnostics/Echo"

    def __init__(self, size_like: Protocol) -> None:
        self.size_like = size_like

    def request(self, obs: npt.NDArray[np.float32]) -> bytes:
        size = len(self.size_like.request(obs))
        return policy_pb2.EchoRequest(payload=b"\0" * max(0, size - 3)).SerializeToString()

    def actions(self, response: bytes) -> npt.NDArray[np.int64]:  # noqa: ARG002  (echo carries no actions)
        return np.zeros(0, np.int64)


class V2Infer(Protocol):
    """The V2 inference protocol's ``ModelInfer`` (as MLServer serves it): input ``obs`` FP32 [B, d] as raw
    contents; the ``action`` output read from raw or typed contents."""

    method = "/inference.GRPCInferenceService/ModelInfer"

    def __init__(self, model: str, mlserver: Venv) -> None:
        self.model = model
        self.request_cls, self.response_cls = _v2_messages(mlserver)

    def request(self, obs: npt.NDArray[np.float32]) -> bytes:
        req = self.request_cls(model_name=self.model)
        tensor = req.inputs.add()
        tensor.name, tensor.datatype = "obs", "FP32"
        tensor.shape.extend(obs.shape)
        req.raw_input_contents.append(np.ascontiguousarray(obs, "<f4").tobytes())
        return bytes(req.SerializeToString())

    def actions(self, response: bytes) -> npt.NDArray[np.int64]:
        resp = self.response_cls.FromString(response)
        for i, out in enumerate(resp.outputs):
            if out.name == "action":
                if resp.raw_output_contents:
                    return np.frombuffer(resp.raw_output_contents[i], "<i8").astype(np.int64)
                return np.asarray(out.contents.int64_contents, np.int64)
        raise ValueError(f"no 'action' output in the V2 response: {[o.name for o in resp.outputs]}")


def _v2_messages(mlserver: Venv) -> tuple[Any, Any]:
    """ModelInferRequest/Response classes from the serialized descriptor in MLServer's ``dataplane_pb2``."""
    found = list(mlserver.path.glob("lib/python*/site-packages/mlserver/grpc/dataplane_pb2.py"))
    if not found:
        raise FileNotFoundError(f"no mlserver/grpc/dataplane_pb2.py in {mlserver.path}")
    match = re.search(r"AddSerializedFile\(\s*(b'.*?')\s*\)", found[0].read_text(), re.S)
    if match is None:
        raise ValueError(f"no serialized descriptor in {found[0]}")
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(match.group(1)))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    package = file_proto.package
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.ModelInferRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.ModelInferResponse")),
    )


def call(target: str, protocol: Protocol, request: bytes, timeout: float = 5.0) -> bytes:
    """One blocking unary call with raw bytes (start-up probes and parity checks)."""
    with grpc.insecure_channel(target) as channel:
        method = channel.unary_unary(
            protocol.method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        return bytes(method(request, timeout=timeout, metadata=protocol.metadata))


# --- servers ------------------------------------------------------------------------------------------------
@dataclass
class RunningServer:
    name: str
    target: str
    protocol: Protocol
    proc: subprocess.Popen[bytes]
    start_s: float
    log: Path
    notes: list[str] = field(default_factory=list)

    def tree(self) -> list[int]:
        return process_tree(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.tree())

    def rss_bytes(self) -> int:
        return rss_bytes(self.tree())


@dataclass(frozen=True)
class LaunchSpec:
    name: str
    cmd: list[str]
    env: dict[str, str]
    cwd: Path
    target: str
    protocol: Protocol
    probe_obs: npt.NDArray[np.float32]
    start_timeout_s: float
    notes: tuple[str, ...] = ()


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _kill_tree(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    pids = process_tree(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    # Whatever is still alive: the group, then each process of the tree seen before the stop (a daemon
    # that left the group, e.g. with setsid, is still in that list).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def start(spec: LaunchSpec, logs: Path, *, stop_grace_s: float = 30.0) -> Iterator[RunningServer]:
    """Start ``spec``'s server, wait for its first successful inference, yield it; always stop it."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{spec.name}.log"
    probe = spec.protocol.request(spec.probe_obs)
    with log_path.open("wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            spec.cmd, cwd=spec.cwd, env=spec.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = started + spec.start_timeout_s
        last: Exception | None = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{spec.name} exited with {proc.returncode} before serving; "
                    f"log {log_path}:\n{_tail(log_path)}"
                )
            try:
                call(spec.target, spec.protocol, probe, timeout=2.0)
                break
            except grpc.RpcError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{spec.name} served no inference within {spec.start_timeout_s:.0f} s (last: {last}); "
                    f"log {log_path}:\n{_tail(log_path)}"
                )
            time.sleep(0.1)
        yield RunningServer(
            spec.name,
            spec.target,
            spec.protocol,
            proc,
            time.monotonic() - started,
            log_path,
            list(spec.notes),
        )
    finally:
        _kill_tree(proc, stop_grace_s)


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "TERM")
    return {k: os.environ[k] for k in keep if k in os.environ}


def polyhead_spec(venv: Venv, bundle: Path, task: str, probe: npt.NDArray[np.float32]) -> LaunchSpec:
    """``polyhead serve`` with its defaults (dynamic batching on, metrics on) and everything on loopback."""
    port = free_port()
    cmd = [
        str(venv.bin("polyhead")), "serve", "--bundle", str(bundle),
        "--host", "127.0.0.1", "--port", str(port),
        "--admin-host", "127.0.0.1", "--admin-port", "0",
        "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        "--no-watch", "--log-level", "WARNING",
    ]  # fmt: skip
    return LaunchSpec(
        "polyhead", cmd, _base_env(), bundle.parent, f"127.0.0.1:{port}", PolicyAct(task), probe, 60.0
    )


def mlserver_spec(
    venv: Venv,
    model: Path,
    task: str,
    work: Path,
    probe: npt.NDArray[np.float32],
    *,
    parallel_workers: int | None,
    name: str = "mlserver",
) -> LaunchSpec:
    """``mlserver start`` on a model folder (``work/<name>``) holding the fused model and
    :mod:`mlserver_runtime`.

    ``parallel_workers`` None keeps MLServer's default (1 inference worker process, which needs the pinned
    uvloop 0.21.0); 0 runs inference in the server process."""
    root = work / name
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, folder / "policy.onnx")
    shutil.copy(HERE / "mlserver_runtime.py", folder / "mlserver_runtime.py")
    (folder / "model-settings.json").write_text(
        json.dumps(
            {
                "name": task,
                "implementation": "mlserver_runtime.OnnxPolicy",
                "parameters": {"uri": "./policy.onnx"},
            }
        )
    )
    port = free_port()
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "grpc_port": port,
        "http_port": free_port(),
        "metrics_port": free_port(),
    }
    notes = ["MLServer default parallel_workers (1 inference worker process), uvloop pinned to 0.21.0"]
    if parallel_workers is not None:
        settings["parallel_workers"] = parallel_workers
        notes = [f"MLServer parallel_workers={parallel_workers}, uvloop pinned to 0.21.0"]
    (root / "settings.json").write_text(json.dumps(settings))
    env = _base_env()
    return LaunchSpec(
        name,
        [str(venv.bin("mlserver")), "start", str(root)],
        env,
        root,
        f"127.0.0.1:{port}",
        V2Infer(task, venv),
        probe,
        120.0,
        tuple(notes),
    )


def ray_spec(
    venv: Venv, model: Path, task: str, work: Path, probe: npt.NDArray[np.float32], *, tuned_max_ongoing: int
) -> LaunchSpec:
    """:mod:`ray_app` in the Ray venv: a local Ray cluster kept on loopback, Serve's gRPC proxy; with
    ``tuned_max_ongoing`` > 0 a second app (:data:`RAY_TUNED_APP`) with that ``max_ongoing_requests``."""
    stubs = compile_ray_stubs(venv, work / "ray-stubs")
    port = free_port()
    env = {
        **_base_env(),
        # Ray binds the node to 127.0.0.1 only with this set (its "local cluster" mode).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": f"{stubs}{os.pathsep}{HERE / 'ray_loopback'}",
    }
    ready = work / "ray.ready"
    ready.unlink(missing_ok=True)
    cmd = [
        str(venv.python), str(HERE / "ray_app.py"), "--model", str(model), "--grpc-port", str(port),
        "--http-port", str(free_port()), "--ready-file", str(ready),
        "--tuned-max-ongoing", str(tuned_max_ongoing),
    ]  # fmt: skip
    return LaunchSpec(
        "ray",
        cmd,
        env,
        work,
        f"127.0.0.1:{port}",
        PolicyAct(task, metadata=(("application", RAY_APP),)),
        probe,
        240.0,
        ("Ray Serve: one replica, default max_ongoing_requests (5); local cluster on 127.0.0.1",),
    )
