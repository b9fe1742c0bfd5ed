"""What the deploy files tell the server, read back through the server's own settings class."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from polyhead.server.settings import ServerSettings

ENV_PREFIX = "POLYHEAD_"


def setting_name(env_name: str) -> str:
    """``POLYHEAD_MAX_BATCH_SIZE`` -> ``max_batch_size``."""
    assert env_name.startswith(ENV_PREFIX), env_name
    return env_name[len(ENV_PREFIX) :].lower()


def unknown_settings(env: Mapping[str, str]) -> list[str]:
    """POLYHEAD_* names in ``env`` that are not ServerSettings fields (typos the server would ignore)."""
    return sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX) and setting_name(name) not in ServerSettings.model_fields
    )


@contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for k in saved:
        del os.environ[k]
    os.environ.update(env)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[k]
        os.environ.update(saved)


def settings_from_env(env: Mapping[str, str], **flags: object) -> ServerSettings:
    """The ServerSettings a server started with ``env`` (and CLI ``flags``, which win) would run with.

    Raises pydantic's ValidationError when a value does not parse or the combination is refused.
    """
    with _environ({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}):
        return ServerSettings(**flags)  # type: ignore[arg-type]


def serve_settings(argv: list[str], env: Mapping[str, str]) -> ServerSettings:
    """The settings ``polyhead <argv>`` (a ``serve`` command line) resolves under ``env``.

    Parses ``argv`` with the real ``polyhead`` parser and resolves it with the real ``serve`` command's
    flags-over-environment rule, so an unknown flag or a refused combination fails here as it would there.
    """
    from polyhead.cli import build_parser
    from polyhead.server.commands import settings_from_args

    args = build_parser().parse_args(argv)
    assert args.command == "serve", argv
    with _environ({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}):
        settings = settings_from_args(args)
    assert isinstance(settings, ServerSettings)
    return settings
