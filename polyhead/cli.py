"""The one ``polyhead`` command. Subcommands are registered by the parts that own them.

``server``, ``trainer`` and ``clients`` each expose ``register_<name>(subparsers)`` functions, found
through the ``polyhead.commands`` entry-point group; the contract layer never imports them directly.
A subcommand whose part is not installed (``polyhead train`` in a serving image without torch) still
appears in ``--help`` and explains which extra to install.

Conventions every subcommand follows (helpers below): ``--json`` prints one machine-readable summary as
the last line of stdout, everything else goes to stderr; ``--log-level`` controls logging; the handler
returns the process exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from polyhead import __version__

ENTRY_POINT_GROUP = "polyhead.commands"

# Used when the package runs from a source tree without installed metadata.
_FALLBACK = {
    "train": "polyhead.trainer.commands:register_train",
    "serve": "polyhead.server.commands:register_serve",
    "simulate": "polyhead.clients.commands:register_simulate",
    "bench": "polyhead.clients.commands:register_bench",
    "adapt": "polyhead.trainer.adapt_commands:register_adapt",
    "demo": "polyhead.trainer.demo_commands:register_demo",
    "operate": "polyhead.trainer.operate_commands:register",
}
_EXTRA_HINT = {
    "train": "train",
    "adapt": "train",
    "demo": "train",
    "serve": "serve",
    "simulate": "client",
    "bench": "client",
    "operate": "train",
}
_ORDER = ["demo", "train", "serve", "simulate", "adapt", "bench", "operate"]
# One-line summaries for `polyhead --help`, so listing the commands imports none of them (a registrar may
# import torch: 0.8 s and hundreds of MB that `polyhead simulate` should not pay).
_SUMMARY = {
    "demo": "train, serve, simulate and adapt a new task online, with a report",
    "train": "train a shared-trunk multi-head policy on a suite with multi-task PPO and export a bundle",
    "serve": "serve a bundle over gRPC (Act, ActStream, ListTasks, ReportExperience, HeadAdmin)",
    "simulate": "run gymnasium environments of a served task through the server",
    "adapt": "train a new task's head against the frozen trunk (local or live experience) and publish it",
    "bench": "measure latency and throughput of a server (concurrency sweep, echo floor, swaps)",
    "operate": "watch live tasks; re-adapt a task that regresses, through canaries (long-running)",
}

Handler = Callable[[argparse.Namespace], int]


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return jsonable(value.item())
    return value


def emit_summary(summary: dict[str, Any], *, as_json: bool, human: str | None = None) -> None:
    """Print the command's result: a human line on stderr, and with ``--json`` the summary as the last
    stdout line (non-finite floats become null so the line is strict JSON)."""
    if human:
        print(human, file=sys.stderr)
    if as_json:
        sys.stdout.flush()
        print(json.dumps(jsonable(summary), sort_keys=False), flush=True)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--log-level``, shared by every subcommand."""
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one machine-readable JSON summary as the last line of stdout (all else goes to stderr)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity on stderr (default: %(default)s)",
    )


def _listed_only(_: Any) -> None:
    """Marker: the subcommand is listed in --help but not imported."""


_LISTED_ONLY = _listed_only


def _load_registrars(only: str | None = None) -> dict[str, Callable[[Any], None] | str]:
    found: dict[str, Callable[[Any], None] | str] = {}
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in _ORDER + sorted(set(eps) - set(_ORDER)):
        target = eps[name].value if name in eps else _FALLBACK.get(name)
        if target is None:
            continue
        if only is not None and name != only and name in _SUMMARY:
            found[name] = _LISTED_ONLY
            continue
        module_name, _, attr = target.partition(":")
        try:
            module = __import__(module_name, fromlist=[attr])
            found[name] = getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            extra = _EXTRA_HINT.get(name, name)
            found[name] = f"unavailable in this install ({exc}); pip install 'polyhead[{extra}]'"
    return found


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that subcommand is registered for real and the others are
    listed by their summaries (what ``main`` does, so one command never imports another's part)."""
    parser = argparse.ArgumentParser(
        prog="polyhead",
        description=(
            "Train, serve and update shared-trunk multi-head RL policies. "
            "Start with `polyhead demo`, or `polyhead <command> --help`."
        ),
    )
    parser.add_argument("--version", action="version", version=f"polyhead {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    registrars = _load_registrars(only)
    for name, registrar in registrars.items():
        if registrar is _LISTED_ONLY:
            sub.add_parser(name, help=_SUMMARY[name], add_help=False)
            continue
        why = registrar if isinstance(registrar, str) else ""
        if callable(registrar):
            try:
                registrar(sub)
                continue
            except ImportError as exc:  # a registrar that imports its part's heavy dependencies (torch)
                extra = _EXTRA_HINT.get(name, name)
                why = f"unavailable in this install ({exc}); pip install 'polyhead[{extra}]'"
        p = sub.add_parser(name, help=f"[{why}]")
        add_common_flags(p)
        p.set_defaults(func=_unavailable(name, why), unavailable=True)
    return parser


def _unavailable(name: str, why: str) -> Handler:
    def handler(_: argparse.Namespace) -> int:
        print(f"polyhead {name}: {why}", file=sys.stderr)
        return 2

    return handler


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _usage_hint(exc: BaseException) -> str:
    """How to fix the usual mistakes whose messages say only what was wrong."""
    from polyhead.errors import BundleNotFound, InvalidTaskSpec, UnsupportedBundleVersion

    if isinstance(exc, BundleNotFound):
        return "; a bundle is the directory `polyhead train --out DIR` writes (manifest.json, trunk.onnx, …)"
    if isinstance(exc, UnsupportedBundleVersion):
        return "; upgrade polyhead, or serve a bundle written by this version"
    if isinstance(exc, InvalidTaskSpec):
        return (
            "; a task spec is a TOML file with [[task]] tables (env, kwargs, attrs, wrappers) or SUITE:TASK "
            "for a built-in suite's task"
        )
    return ""


def _fail(command: str, exc: BaseException, status: int, *, debug: bool) -> int:
    """Report a failed command as one line on stderr (the traceback too, with ``--log-level DEBUG``)."""
    from polyhead.errors import UsageError

    message = " ".join(str(exc).split()) or type(exc).__name__
    if type(exc) is not UsageError:  # the class says what kind of problem (BundleNotFound, InvalidTaskSpec)
        message = f"{type(exc).__name__}: {message}"
    if debug:
        logging.getLogger("polyhead").debug("%s failed", command, exc_info=exc)
    print(f"polyhead {command}: error: {message}{_usage_hint(exc)}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns its exit status.

    Exit status 2, with one line on stderr that says what was wrong and how to fix it (no traceback
    unless ``--log-level DEBUG``): bad flags, a UsageError (a port in use, an unreadable file, a server
    that does not answer), a missing or malformed bundle, a bad task spec or argument. Status 1: any other
    polyhead error, or a gRPC call that failed after its retries. Anything else is a bug and keeps its
    traceback.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    # The subcommand is the first word that is not an option (the top level takes no option values).
    command = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(only=command or "")
    args, unknown = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "unavailable", None):  # its part is not installed: say so whatever the flags were
        return int(args.func(args))
    if unknown:
        parser.parse_args(argv)  # argparse's own message and exit status 2
    level = getattr(args, "log_level", "INFO")
    configure_logging(level)
    name = str(args.command)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        status = _exit_status(exc)
        if status is None:
            raise
        return _fail(name, exc, status, debug=level == "DEBUG")


def _exit_status(exc: Exception) -> int | None:
    """2 for what the user can fix in the command line, 1 for other polyhead errors and for a gRPC call that
    failed after its retries (a server that went away mid-run is the environment's doing, not a bug),
    None for anything else (a bug: it keeps its traceback)."""
    from polyhead.clients.errors import PolicyClientError
    from polyhead.errors import (
        BundleError,
        InvalidArgument,
        InvalidTaskSpec,
        PolyheadError,
        Unauthenticated,
        UsageError,
    )

    if isinstance(exc, UsageError | BundleError | InvalidTaskSpec | InvalidArgument | Unauthenticated):
        return 2
    if isinstance(exc, PolyheadError | PolicyClientError):
        return 1
    return None
