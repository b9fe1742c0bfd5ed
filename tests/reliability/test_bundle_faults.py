"""Malformed bundles and heads: `polyhead serve` refuses a broken trunk or manifest with exit status 2 and a
message naming the problem; a broken head is skipped (counted) while the other tasks serve; LoadHead of a
broken version directory is refused and changes nothing. tests/contract covers Bundle.open's errors and
tests/server a missing bundle directory; this covers what the serving process and LoadHead do with them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from polyhead.server.app import BackgroundServer
from polyhead.v1 import admin_pb2, admin_pb2_grpc


def serve_once(bundle: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "polyhead", "serve", "--bundle", str(bundle), "--port", "0"]
    argv += ["--admin-port", "0", "--no-metrics", "--no-watch", "--host", "127.0.0.1"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def truncate(path: Path) -> bytes:
    data = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(data)
    return data


def truncated_trunk_with_matching_hash(bundle: Path) -> None:
    """A truncated trunk.onnx whose manifest hash was updated too: only ONNX parsing can catch it."""
    data = truncate(bundle / "trunk.onnx")
    edit_json(bundle / "manifest.json", trunk_sha256=hashlib.sha256(data).hexdigest())


BROKEN_TRUNKS: dict[str, tuple[Callable[[Path], Any], str]] = {
    "missing trunk.onnx": (lambda b: (b / "trunk.onnx").unlink(), "trunk.onnx"),
    "truncated trunk.onnx (hash mismatch)": (lambda b: truncate(b / "trunk.onnx"), "sha256"),
    "truncated trunk.onnx (hash updated)": (truncated_trunk_with_matching_hash, "trunk"),
    "manifest from a future format version": (
        lambda b: edit_json(b / "manifest.json", format_version=99),
        "format",
    ),
    "manifest not JSON": (lambda b: (b / "manifest.json").write_text("{truncated"), "JSON"),
    "missing manifest": (lambda b: (b / "manifest.json").unlink(), "manifest"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TRUNKS))
def test_serve_refuses_a_broken_bundle_with_a_clear_message(bundle_copy: Path, case: str) -> None:
    breaker, expected = BROKEN_TRUNKS[case]
    breaker(bundle_copy)
    result = serve_once(bundle_copy)
    assert result.returncode == 2, (case, result.returncode, result.stderr[-2000:])
    assert expected.lower() in result.stderr.lower(), (case, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, (case, result.stderr[-3000:])


BROKEN_HEADS: dict[str, Callable[[Path], Any]] = {
    "truncated head.onnx": lambda d: truncate(d / "head.onnx"),
    "head.json of a future format version": lambda d: edit_json(d / "head.json", format_version=99),
    "head.json not JSON": lambda d: (d / "head.json").write_text("{"),
    "head.onnx random bytes (hash updated)": lambda d: (
        (d / "head.onnx").write_bytes(b"\x08\x07garbage" * 10),
        edit_json(d / "head.json", head_sha256=hashlib.sha256(b"\x08\x07garbage" * 10).hexdigest()),
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_HEADS))
def test_a_broken_head_is_skipped_and_refused_on_load(
    server_settings: Callable[..., Any], bundle_copy: Path, case: str
) -> None:
    """At start the broken head's task is not served (counted, logged) while the others serve; on a
    running server, LoadHead of the broken directory is refused with a client-mistake code and the served
    versions do not change."""
    broken = bundle_copy / "heads" / "acrobot" / "1"
    spare = bundle_copy / "heads" / "cartpole" / "2"
    BROKEN_HEADS[case](broken)
    with BackgroundServer(server_settings(bundle=bundle_copy, watch_bundle=False)) as srv:
        assert sorted(srv.registry.tasks) == ["cartpole", "cartpole-continuous"]
        # The same damage on a version published later, loaded by path on the running server.
        spare.mkdir()
        for source in (bundle_copy / "heads" / "cartpole" / "1").iterdir():  # head, encoder, head.json
            (spare / source.name).write_bytes(source.read_bytes())
        edit_json(spare / "head.json", version=2)
        BROKEN_HEADS[case](spare)
        with grpc.insecure_channel(srv.admin_target) as ch:
            admin = admin_pb2_grpc.HeadAdminStub(ch)  # type: ignore[no-untyped-call]
            before = admin.ListHeads(admin_pb2.ListHeadsRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                admin.LoadHead(
                    admin_pb2.LoadHeadRequest(task_id="cartpole", repository_path="heads/cartpole/2"),
                    timeout=30,
                )
            assert err.value.code() in {
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.DATA_LOSS,
            }, (case, err.value.code(), err.value.details())
            assert (err.value.details() or "").strip()
            assert admin.ListHeads(admin_pb2.ListHeadsRequest(), timeout=10) == before
