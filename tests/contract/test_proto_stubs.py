"""The checked-in stubs must be exactly what protoc generates from proto/ (regenerate: make proto)."""

from __future__ import annotations

from pathlib import Path

from polyhead.protogen import STUB_DIR, generate


def test_checked_in_stubs_match_proto(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert generated, "protoc produced no files"
    names = {p.name for p in generated}
    checked_in = {p.name for p in STUB_DIR.glob("*_pb2*")}
    assert names == checked_in, (
        f"stub files differ: generated {sorted(names)}, checked in {sorted(checked_in)}"
    )
    for path in generated:
        current = (STUB_DIR / path.name).read_bytes()
        assert current == path.read_bytes(), f"{path.name} drifted from proto/; run `make proto` and commit"


def test_services_have_the_fixed_names() -> None:
    from polyhead.v1 import admin_pb2, policy_pb2

    policy = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"]
    assert {m.name for m in policy.methods} >= {"Act", "ActStream", "ListTasks", "ReportExperience"}
    admin = admin_pb2.DESCRIPTOR.services_by_name["HeadAdmin"]
    assert {m.name for m in admin.methods} >= {
        "LoadHead",
        "SetActiveVersion",
        "UnloadHead",
        "ListHeads",
        "StreamExperience",
    }
    assert policy_pb2.DESCRIPTOR.package == "polyhead.v1"
