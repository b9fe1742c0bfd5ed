"""Settings: environment prefix, flags over environment, frozen, validation; `polyhead serve --help`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from polyhead.server.commands import register_serve, settings_from_args
from polyhead.server.settings import ServerSettings


def test_environment_prefix_and_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POLYHEAD_BUNDLE", str(tmp_path))
    monkeypatch.setenv("POLYHEAD_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("POLYHEAD_ADMIN_TOKEN", "t")
    monkeypatch.setenv("POLYHEAD_WATCH_BUNDLE", "false")
    settings = ServerSettings()  # type: ignore[call-arg]
    assert settings.bundle == tmp_path
    assert settings.max_batch_size == 64
    assert settings.admin_token == "t"
    assert settings.watch_bundle is False
    assert (settings.port, settings.admin_host, settings.admin_port, settings.metrics_port) == (
        50051,
        "127.0.0.1",
        50052,
        9100,
    )
    with pytest.raises(pydantic.ValidationError):
        settings.port = 1  # type: ignore[misc]


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse

    monkeypatch.setenv("POLYHEAD_PORT", "7000")
    monkeypatch.setenv("POLYHEAD_MAX_QUEUE_SIZE", "9")
    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    args = parser.parse_args(
        [
            "serve",
            "--bundle",
            str(tmp_path),
            "--port",
            "0",
            "--no-batching",
            "--no-metrics",
            "--no-stacked-heads",
        ]
    )
    settings = settings_from_args(args)
    assert settings.stacked_heads is False
    assert settings.port == 0
    assert settings.max_queue_size == 9
    assert settings.batching is False
    assert settings.metrics_port is None


@pytest.mark.parametrize(
    "bad",
    [
        {"tls_cert": "c.pem"},  # key missing
        {"tls_client_ca": "ca.pem"},  # mTLS without a certificate
        {"admin_port": 50051},  # same as the data plane in separate mode
        {"max_batch_size": 0},
        {"admin_mode": "public"},
        {"unknown_field": 1},
    ],
)
def test_invalid_settings_are_refused(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        ServerSettings(bundle=tmp_path, **bad)  # type: ignore[arg-type]


def test_serve_help_explains_the_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "polyhead", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (
        "--bundle",
        "--port",
        "--admin-port",
        "--metrics-port",
        "--ready-file",
        "--admin-token",
        "--max-batch-size",
        "--tls-cert",
        "--grace-period",
        "--json",
    ):
        assert flag in out


def test_missing_bundle_fails_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "polyhead",
            "serve",
            "--bundle",
            str(tmp_path / "nope"),
            "--port",
            "0",
            "--admin-port",
            "0",
            "--metrics-port",
            "0",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "BundleNotFound" in result.stderr and "Traceback" not in result.stderr
