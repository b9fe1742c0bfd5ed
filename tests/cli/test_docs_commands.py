"""Docs stay true: every ``polyhead <command> ...`` line in a code block of README.md and docs/*.md (and
every inline code span that starts with one) names a real command, and every ``--flag`` it uses exists in
that command's parser (built through ``polyhead.cli``, as the installed command builds it)."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from polyhead.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    command: str
    flags: tuple[str, ...]


def code_lines(path: Path) -> list[tuple[int, str]]:
    """Lines inside fenced code blocks, with backslash continuations joined (numbered by their first line)."""
    out: list[tuple[int, str]] = []
    inside = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            continue
        start, text = pending if pending is not None else (number, "")
        text += " " + line.rstrip()
        if text.endswith("\\"):
            pending = (start, text[:-1])
            continue
        pending = None
        out.append((start, text.strip()))
    return out


def inline_spans(path: Path) -> list[tuple[int, str]]:
    """Inline code spans (`...`) outside fenced blocks that start with a polyhead command; a span may run
    over a line break, as in prose."""
    prose: list[str] = []
    inside = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
            prose.append("")
            continue
        prose.append("" if inside else line)
    text = "\n".join(prose)
    return [
        (text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
        for m in re.finditer(r"`([^`]+)`", text)
        if re.match(r"(\S*/)?polyhead [a-z]+ ", m.group(1).strip() + " ")
    ]


def parse(where: str, line: str) -> list[DocCommand]:
    found = []
    text = line.split(" #", 1)[0]  # a trailing shell comment explains, it is not part of the command
    for segment in re.split(r"&&|\|\||;|\|", text):
        try:
            words = shlex.split(segment)
        except ValueError:  # an illustration with an unbalanced quote
            words = segment.split()
        # `polyhead <command>` or `python -m polyhead <command>`, after any env assignments or wrappers; not
        # an option's value (`kubectl -n polyhead ...`).
        for i, word in enumerate(words[:-1]):
            if (word == "polyhead" or word.endswith("/polyhead")) and not (
                i and words[i - 1].startswith("-")
            ):
                command = words[i + 1]
                if command.startswith("-") or not re.fullmatch(r"[a-z]+", command):
                    break
                flags = tuple(w.split("=", 1)[0] for w in words[i + 2 :] if w.startswith("--"))
                found.append(DocCommand(where, command, flags))
                break
    return found


def commands_in(path: Path) -> list[DocCommand]:
    name = path.relative_to(REPO)
    lines = [(n, line) for n, line in code_lines(path) if "polyhead" in line] + inline_spans(path)
    return [c for number, line in lines for c in parse(f"{name}:{number}", line)]


ALL = [c for path in DOCS for c in commands_in(path)]


@cache
def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_docs_show_commands() -> None:
    # The scan itself works: the README's own examples are found.
    commands = {c.command for c in ALL if c.where.startswith("README.md")}
    assert {"train", "serve", "simulate", "adapt", "bench"} <= commands, commands
    assert len(ALL) >= 20


@pytest.mark.parametrize("doc", ALL, ids=[f"{c.where}:{c.command}" for c in ALL])
def test_every_documented_flag_exists(doc: DocCommand) -> None:
    parsers = subparsers()
    assert doc.command in parsers, (
        f"{doc.where}: `polyhead {doc.command}` is not a command ({sorted(parsers)})"
    )
    known = set(parsers[doc.command]._option_string_actions)
    unknown = [flag for flag in doc.flags if flag not in known]
    assert not unknown, f"{doc.where}: `polyhead {doc.command}` has no {unknown}"


def test_a_wrong_flag_is_caught() -> None:
    (doc,) = parse(
        "x.md:1", "POLYHEAD_PORT=1 .venv/bin/polyhead serve --bundle b --no-such-flag=3  # comment --x"
    )
    assert doc.command == "serve" and doc.flags == ("--bundle", "--no-such-flag")
    with pytest.raises(AssertionError, match="no-such-flag"):
        test_every_documented_flag_exists(doc)
    assert parse("x.md:1", "kubectl -n polyhead run pod --image=busybox") == []
