"""The bundle format: atomic writes, hash verification, version pointers, refusing incompatible heads;
format 2 (per-task encoders versioned with the heads) and format 1 (padded trunk, still read).

These tests use placeholder bytes for the ONNX files: the format layer stores and hashes them without
parsing (ONNX validity is checked where a session is built: the server's registry and the exporter).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from polyhead.bundle import (
    STALE_TEMP_S,
    Bundle,
    HeadMeta,
    Manifest,
    sha256_bytes,
    write_bundle,
)
from polyhead.errors import (
    BundleError,
    BundleIntegrityError,
    BundleNotFound,
    IncompatibleHead,
    UnknownVersion,
    UnsupportedBundleVersion,
    VersionConflict,
)
from polyhead.spaces import BoxSpec, DiscreteSpec
from polyhead.taskspec import TaskSpec

OBS = BoxSpec(shape=(4,), low=(-1.0,) * 4, high=(1.0,) * 4)
V1_FIXTURE = Path(__file__).parent.parent / "fixtures" / "bundle_v1"
ENC = b"encoder-bytes"


def manifest() -> Manifest:
    return Manifest(
        trunk_sha256="",
        checkpoint_sha256="",
        embedding_size=6,
        encoders={"g": {"kind": "mlp", "tasks": ["a", "b"]}},
        feature_size=8,
        suite="test",
        tasks=("a", "b"),
    )


def head(task_id: str, trunk_sha: str = "") -> HeadMeta:
    return HeadMeta(
        task=TaskSpec(id=task_id, env="CartPole-v1"),
        observation_space=OBS,
        action_space=DiscreteSpec(2),
        distribution="categorical",
        trunk_sha256=trunk_sha,
        feature_size=8,
        observation_size=4,
        eval_return=123.0,
        embedding_size=6,
        encoder={"name": "g", "kind": "mlp"},
    )


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return write_bundle(
        tmp_path / "b",
        manifest=manifest(),
        trunk_onnx=b"trunk-bytes",
        checkpoint=b"ckpt",
        heads=[(head("a"), b"head-a", ENC), (head("b"), b"head-b", ENC)],
    )


def test_round_trip(bundle: Bundle) -> None:
    reopened = Bundle.open(bundle.root)
    assert reopened.manifest.trunk_sha256 == sha256_bytes(b"trunk-bytes")
    assert reopened.manifest.checkpoint_sha256 == sha256_bytes(b"ckpt")
    assert reopened.task_ids() == ["a", "b"]
    record = reopened.head("a")
    assert record.version == 1
    assert record.meta.trunk_sha256 == reopened.manifest.trunk_sha256
    assert record.read_onnx() == b"head-a"
    assert record.read_encoder() == ENC and record.meta.encoder_sha256 == sha256_bytes(ENC)
    assert reopened.manifest.format_version == 2 and reopened.manifest.embedding_size == 6
    assert record.meta.eval_return == 123.0
    assert record.meta.task == head("a").task
    reopened.verify_checkpoint()


def test_versions_and_active_pointer(bundle: Bundle) -> None:
    trunk = bundle.manifest.trunk_sha256
    v2 = bundle.write_head(head("a", trunk), b"head-a-v2", encoder=ENC)
    assert v2.version == 2 and bundle.active_version("a") == 2
    v3 = bundle.write_head(head("a", trunk), b"head-a-v3", encoder=ENC, activate=False)
    assert bundle.versions("a") == [1, 2, 3] and bundle.active_version("a") == 2
    bundle.set_active_version("a", 1)
    assert bundle.active_version("a") == 1
    assert bundle.head("a", v3.version).read_onnx() == b"head-a-v3"
    with pytest.raises(UnknownVersion):
        bundle.set_active_version("a", 9)
    with pytest.raises(VersionConflict):
        bundle.write_head(head("a", trunk), b"x", encoder=ENC, version=2)


def test_half_written_head_is_invisible(bundle: Bundle) -> None:
    # What a writer killed mid-publish leaves behind: a hidden temp dir with a partial head.
    partial = bundle.task_dir("a") / ".v2-abandoned"
    partial.mkdir()
    (partial / "head.onnx").write_bytes(b"half")
    # A version directory without its metadata (not produced by write_head, but never trusted either).
    (bundle.task_dir("a") / "7").mkdir()
    assert bundle.versions("a") == [1]
    assert bundle.active_version("a") == 1
    # The next publish is unaffected by the debris.
    assert bundle.write_head(head("a", bundle.manifest.trunk_sha256), b"v2", encoder=ENC).version == 2
    # A fresh temp dir may belong to a writer still at work: it stays.
    assert partial.is_dir()


def test_a_publish_removes_temp_dirs_of_writers_that_died_long_ago(bundle: Bundle) -> None:
    tdir = bundle.task_dir("a")
    dead = tdir / ".v5-killedwriter"
    dead.mkdir()
    (dead / "head.onnx").write_bytes(b"half")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(dead, (old, old))
    dead_pointer = tdir / ".active.json.0123abcd.tmp"
    dead_pointer.write_text('{"version": 1}')
    os.utime(dead_pointer, (old, old))
    working = tdir / ".v6-stillwriting"
    working.mkdir()
    bundle.write_head(head("a", bundle.manifest.trunk_sha256), b"v2", encoder=ENC)
    assert not dead.exists()
    assert not dead_pointer.exists()
    assert working.is_dir()
    assert bundle.versions("a") == [1, 2]


def test_half_written_bundle_is_not_a_bundle(tmp_path: Path) -> None:
    # A bundle directory is complete only once the manifest (written last) is there.
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "trunk.onnx").write_bytes(b"t")
    with pytest.raises(BundleNotFound, match="manifest"):
        Bundle.open(staged)
    with pytest.raises(BundleNotFound):
        Bundle.open(tmp_path / "missing")


def test_trunk_hash_mismatch_is_refused(bundle: Bundle) -> None:
    (bundle.root / "trunk.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleIntegrityError, match="sha256"):
        Bundle.open(bundle.root)


def test_head_hash_mismatch_is_refused(bundle: Bundle) -> None:
    (bundle.head("a").path / "head.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleIntegrityError):
        bundle.head("a").read_onnx()


def test_future_format_version_is_refused(bundle: Bundle) -> None:
    path = bundle.root / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(UnsupportedBundleVersion, match="upgrade"):
        Bundle.open(bundle.root)


def test_malformed_manifest_is_refused(bundle: Bundle) -> None:
    path = bundle.root / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(bundle.root)
    path.write_text(json.dumps({"format": "polyhead-bundle", "format_version": 1}))
    with pytest.raises(BundleError, match="malformed"):
        Bundle.open(bundle.root)


def test_head_for_other_trunk_is_refused(bundle: Bundle) -> None:
    with pytest.raises(IncompatibleHead, match="trunk"):
        bundle.write_head(head("a", "0" * 64), b"x", encoder=ENC)
    wrong_features = head("a", bundle.manifest.trunk_sha256).with_(feature_size=16)
    with pytest.raises(IncompatibleHead, match="features"):
        bundle.write_head(wrong_features, b"x", encoder=ENC)
    assert bundle.versions("a") == [1]


def test_existing_output_needs_overwrite(bundle: Bundle) -> None:
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(bundle.root, manifest=manifest(), trunk_onnx=b"t2", checkpoint=b"c", heads=[])
    replaced = write_bundle(
        bundle.root, manifest=manifest(), trunk_onnx=b"t2", checkpoint=b"c", heads=[], overwrite=True
    )
    assert replaced.manifest.trunk_sha256 == sha256_bytes(b"t2")
    assert not [p for p in os.listdir(bundle.root.parent) if p.startswith(".")], "temp dirs left behind"


def test_head_meta_json_round_trip() -> None:
    meta = head("a", "f" * 64).with_(
        action_space=BoxSpec(shape=(1,), low=(-1.0,), high=(1.0,)),
        distribution="gaussian",
        outputs=("mean", "log_std", "value"),
    )
    again = HeadMeta.from_json(json.loads(json.dumps(meta.to_json())))
    assert again == meta


def test_format_2_version_needs_its_encoder(bundle: Bundle) -> None:
    trunk = bundle.manifest.trunk_sha256
    with pytest.raises(IncompatibleHead, match="encoder"):
        bundle.write_head(head("a", trunk), b"head-only")
    without = head("a", trunk).with_(embedding_size=0)
    with pytest.raises(IncompatibleHead, match="no encoder"):
        bundle.write_head(without, b"head-only", encoder=ENC)
    wrong_width = head("a", trunk).with_(embedding_size=9)
    with pytest.raises(IncompatibleHead, match="6-value embedding"):
        bundle.write_head(wrong_width, b"x", encoder=ENC)
    assert bundle.versions("a") == [1]


def test_encoder_hash_mismatch_is_refused(bundle: Bundle) -> None:
    (bundle.head("a").path / "encoder.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleIntegrityError, match=r"encoder\.onnx"):
        bundle.head("a").read_encoder()


def test_format_1_bundle_still_opens(tmp_path: Path) -> None:
    """The checked-in format-1 bundle (written by polyhead before per-task encoders) reads as it is."""
    v1 = Bundle.open(V1_FIXTURE)
    assert v1.manifest.format_version == 1 and not v1.manifest.has_encoders
    assert v1.manifest.observation_size == 4 and v1.manifest.trunk_input_size == 4
    record = v1.head("cartpole-long-pole")
    assert not record.meta.has_encoder and record.read_encoder() is None
    assert record.read_onnx()
    # Round trip: the manifest writes back as format 1.
    assert Manifest.from_json(v1.manifest.to_json(), where="again") == v1.manifest
