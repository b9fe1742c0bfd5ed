"""Suite [[encoder]] groups: parsed with the tasks, each mistake named with its field."""

from __future__ import annotations

import pytest

from polyhead.errors import InvalidTaskSpec
from polyhead.taskspec import EncoderSpec, load_suite, parse_suite

TASKS = '[[task]]\nid = "a"\nenv = "CartPole-v1"\n[[task]]\nid = "b"\nenv = "CartPole-v1"\n'


def test_groups_parse_and_ungrouped_tasks_get_their_own() -> None:
    suite = parse_suite(
        TASKS
        + '[[encoder]]\nname = "g"\ntasks = ["a"]\nkind = "cnn"\nimage_shape = [2, 2, 1]\nhidden = [8]\n',
        source="t",
    )
    assert suite.encoder_for("a") == EncoderSpec("g", ("a",), "cnn", (8,), (2, 2, 1))
    assert suite.encoder_for("b") == EncoderSpec("b", ("b",))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('name = "g"\ntasks = ["zz"]', "unknown task"),
        ('name = "g"\ntasks = []', "'tasks'"),
        ('name = "g"\ntasks = ["a"]\nkind = "rnn"', "'kind'"),
        ('name = "g"\ntasks = ["a"]\nkind = "cnn"', "image_shape"),
        ('name = "g"\ntasks = ["a"]\nhidden = [0]', "'hidden'"),
        ('name = "g"\ntasks = ["a"]\ncolour = 1', "unknown field"),
        ('name = "G!"\ntasks = ["a"]', "'name'"),
    ],
)
def test_bad_groups_are_refused_naming_the_field(table: str, message: str) -> None:
    with pytest.raises(InvalidTaskSpec, match=message):
        parse_suite(TASKS + "[[encoder]]\n" + table + "\n", source="t")


def test_a_task_has_one_encoder() -> None:
    twice = '[[encoder]]\nname = "g"\ntasks = ["a"]\n[[encoder]]\nname = "h"\ntasks = ["a", "b"]\n'
    with pytest.raises(InvalidTaskSpec, match="a task has one encoder"):
        parse_suite(TASKS + twice, source="t")


def test_builtin_groups() -> None:
    assert [e.name for e in load_suite("cartpole-family").encoders] == ["cartpole"]
    assert load_suite("classic-mixed").encoders == ()  # each env its own encoder
    (view,) = load_suite("minigrid").encoders
    assert view.kind == "cnn" and view.image_shape == (7, 7, 3)
