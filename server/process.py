"""``polyhead serve`` as a child process on free ports, for programs that run a server beside themselves
(``polyhead demo``, the server benchmarks): start, wait until it serves, stop gracefully.

The child is the real command in its own process (its own GIL, its own signal handling), so what runs is
exactly what a user runs; the bound ports come back through ``--ready-file``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from polyhead.errors import PolyheadError


class ServeProcessError(PolyheadError):
    """The child server exited or did not become ready; the message says where its output went."""


class ServeProcess:
    """Start ``polyhead serve --bundle BUNDLE`` on 127.0.0.1 with every port picked free.

    ``args`` are extra ``polyhead serve`` flags; ``env`` replaces the child's environment when given;
    ``log_path`` receives its stdout and stderr (default: inherited). Blocks until the server accepts
    calls; raises ServeProcessError when it exits first or is not ready within ``ready_timeout_s``.
    :meth:`stop` (also on leaving a ``with`` block) sends SIGTERM, the graceful drain, and returns the
    exit status.
    """

    def __init__(
        self,
        bundle: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        ready_timeout_s: float = 90.0,
    ) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="polyhead-serve-"))
        self.ready_file = self._dir / "ready.json"
        self.log_path = log_path
        self._log: IO[bytes] | None = log_path.open("wb") if log_path is not None else None
        argv = [
            sys.executable, "-m", "polyhead", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
            "--port", "0", "--admin-port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
            "--ready-file", str(self.ready_file), *args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            env=dict(env) if env is not None else None,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log is not None else None,
        )
        try:
            self.ready: dict[str, Any] = self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _where(self) -> str:
        return f"; see {self.log_path}" if self.log_path is not None else ""

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeProcessError(
                    f"polyhead serve exited with status {self.proc.returncode}{self._where()}"
                )
            if self.ready_file.is_file():
                data: dict[str, Any] = json.loads(self.ready_file.read_text())
                return data
            time.sleep(0.05)
        raise ServeProcessError(f"polyhead serve was not ready within {timeout:.0f} s{self._where()}")

    @property
    def port(self) -> int:
        return int(self.ready["port"])

    @property
    def admin_port(self) -> int | None:
        value = self.ready.get("admin_port")
        return int(value) if value is not None else None

    @property
    def metrics_port(self) -> int | None:
        value = self.ready.get("metrics_port")
        return int(value) if value is not None else None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_target(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain), then kill after ``timeout``; returns the exit status. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        return int(self.proc.returncode)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
