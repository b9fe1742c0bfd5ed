"""Seconds from launching ``polyhead serve`` to its ready file, for source trees side by side.

    .venv/bin/python benchmarks/server_startup_ab.py --arm base=/tmp/snap-base --arm new=/tmp/snap-new \\
        --bundle /tmp/wt15e-bundle --big /tmp/wt15e-bundle-10000-distinct-heads --rounds 3

Each arm is a source tree (``git archive REV | tar -x -C DIR``) put first on ``PYTHONPATH``; the server runs
from a temporary directory so that this checkout does not shadow it. Per round and arm (arms alternating,
order reversed every other round): the plain bundle, then the big one (``server_heads.py --bundle-heads N``
builds one). Prints a line per start and one JSON line with every time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ready_seconds(source: Path, bundle: Path, workdir: Path) -> float:
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "polyhead", "serve", "--bundle", str(bundle), "--port", "0"]
    argv += ["--admin-port", "0", "--metrics-port", "0", "--no-watch", "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONPATH": str(source)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*argv, "--ready-file", str(ready)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while not (ready.is_file() and ready.stat().st_size):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"polyhead serve from {source} exited: {proc.stderr.read().decode()[-2000:]}"
                )  # type: ignore[union-attr]
            time.sleep(0.02)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arm", action="append", required=True, help="NAME=SOURCE_DIR (repeat)")
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument(
        "--big", type=Path, required=True, help="the same bundle with many more heads on disk"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    arms = [(name, Path(path).resolve()) for name, _, path in (a.partition("=") for a in args.arm)]
    times: dict[str, dict[str, list[float]]] = {name: {"plain": [], "big": []} for name, _ in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, source in arms if r % 2 == 0 else arms[::-1]:
                for kind, bundle in (("plain", args.bundle), ("big", args.big)):
                    seconds = ready_seconds(source, bundle, Path(tmp))
                    times[name][kind].append(seconds)
                    load = os.getloadavg()[0]
                    print(f"round {r} {name} {kind}: {seconds:.2f} s (load {load:.2f})", file=sys.stderr)
    print(json.dumps({"benchmark": "server_startup_ab", "cpus": os.cpu_count(), "times_s": times}))


if __name__ == "__main__":
    main()
