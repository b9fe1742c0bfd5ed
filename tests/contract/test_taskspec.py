"""Task specs and suites: every bad spec fails before any training, naming the task and the field."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from polyhead.envs import make_env, validate_task
from polyhead.errors import InvalidTaskSpec
from polyhead.taskspec import TaskSpec, builtin_suites, load_suite, load_task_spec, parse_suite


def suite_text(task_body: str, extra: str = "") -> str:
    return f'[[task]]\nid = "t1"\n{task_body}\n{extra}'


def validate_all(text: str) -> None:
    for task in parse_suite(text, source="test.toml").tasks:
        validate_task(task)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (suite_text('env = "NoSuchEnv-v9"'), ["'t1'", "'env'", "NoSuchEnv-v9"]),
        (
            suite_text('env = "CartPole-v1"\nattrs = { pole_colour = 1.0 }'),
            ["'t1'", "attrs.pole_colour", "no attribute"],
        ),
        (suite_text('env = "CartPole-v1"\nattrs = { length = "long" }'), ["'t1'", "attrs.length", "float"]),
        (suite_text('env = "CartPole-v1"\nattrs = { length = true }'), ["'t1'", "attrs.length"]),
        (suite_text('env = "CartPole-v1"\nattrs = { step = 1 }'), ["'t1'", "attrs.step", "method"]),
        (
            suite_text('env = "CartPole-v1"') + '\n[[task]]\nid = "t1"\nenv = "CartPole-v1"\n',
            ["'t1'", "duplicate", "'id'"],
        ),
        (suite_text('env = "CartPole-v1"\ntarget_return = "high"'), ["'t1'", "target_return"]),
        (suite_text('env = "CartPole-v1"\nmax_episode_steps = -5'), ["'t1'", "max_episode_steps"]),
        (suite_text('env = "CartPole-v1"\ncolour = "red"'), ["'t1'", "unknown field", "colour"]),
        (suite_text('env = "CartPole-v1"\nrole = "test"'), ["'t1'", "'role'"]),
        ('[[task]]\nid = "Bad Id"\nenv = "CartPole-v1"\n', ["'id'", "Bad Id"]),
        ('[[task]]\nenv = "CartPole-v1"\n', ["'id'"]),
        ('[[task]]\nid = "t1"\n', ["'t1'", "'env'"]),
        (suite_text('env = "CartPole-v1"\nkwargs = { no_such_kwarg = 1 }'), ["'t1'", "'kwargs'"]),
        (
            suite_text('env = "CartPole-v1"', '[[task.wrappers]]\nname = "teleport"\n'),
            ["'t1'", "wrappers[0]", "unknown wrapper", "target-position"],
        ),
        (
            suite_text('env = "CartPole-v1"', '[[task.wrappers]]\nname = "target-position"\n'),
            ["'t1'", "wrappers[0]", "missing parameter 'target'"],
        ),
        (
            suite_text(
                'env = "CartPole-v1"',
                '[[task.wrappers]]\nname = "target-position"\nparams = { target = "left" }\n',
            ),
            ["'t1'", "'target'", "float"],
        ),
        (
            suite_text(
                'env = "CartPole-v1"',
                '[[task.wrappers]]\nname = "reverse-action"\nparams = { strength = 2.0 }\n',
            ),
            ["'t1'", "unknown parameter", "strength"],
        ),
        ("[suite]\nname = 'x'\n", ["no tasks"]),
        ("[[task]\nid=", ["not valid TOML"]),
    ],
)
def test_bad_specs_fail_with_task_and_field(text: str, fragments: list[str]) -> None:
    with pytest.raises(InvalidTaskSpec) as info:
        validate_all(text)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_attrs_recompute_cartpole_derived_physics() -> None:
    task = TaskSpec(id="t", env="CartPole-v1", attrs={"masspole": 0.5, "length": 1.0})
    env = make_env(task)
    try:
        u = env.unwrapped
        assert u.masspole == 0.5 and u.length == 1.0
        # CartPoleEnv computes these once in __init__; stale values would silently keep default physics.
        assert math.isclose(u.total_mass, 0.5 + u.masscart)
        assert math.isclose(u.polemass_length, 0.5 * 1.0)
    finally:
        env.close()


def test_builtin_suites_load_and_validate() -> None:
    names = builtin_suites()
    assert {"cartpole-family", "classic-mixed", "minigrid", "minigrid-keys", "minigrid-lava"} <= set(names)
    family = load_suite("cartpole-family")
    assert len(family.train_tasks) >= 4 and len(family.heldout_tasks) >= 2
    for task in family.tasks:
        obs, act = validate_task(task)
        assert obs.shape == (4,) and act.n == 2  # type: ignore[union-attr]
    mixed = load_suite("classic-mixed")
    kinds = {type(validate_task(t)[1]).__name__ for t in mixed.tasks}
    assert kinds == {"DiscreteSpec", "BoxSpec"}


def test_reverse_action_wrapper_swaps_actuator() -> None:
    plain = make_env(TaskSpec(id="a", env="CartPole-v1"))
    reversed_ = make_env(
        TaskSpec(
            id="b", env="CartPole-v1", wrappers=(load_task_spec("cartpole-family:cartpole-reversed").wrappers)
        )
    )
    try:
        o1, _ = plain.reset(seed=3)
        o2, _ = reversed_.reset(seed=3)
        s1 = plain.step(1)[0]
        s2 = reversed_.step(0)[0]
        assert (o1 == o2).all() and (s1 == s2).all()
    finally:
        plain.close()
        reversed_.close()


def test_target_position_reward_penalises_distance() -> None:
    task = load_task_spec("cartpole-family:cartpole-target-right")
    env = make_env(task)
    try:
        env.reset(seed=0)
        _, reward, *_, info = env.step(0)
        assert reward < 1.0 and 0.0 < info["target_distance"] <= 1.0
    finally:
        env.close()


def test_task_spec_file_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "new.toml"
    path.write_text('[[task]]\nid = "my-task"\nenv = "CartPole-v1"\nattrs = { gravity = 5.0 }\n')
    task = load_task_spec(path)
    assert task.id == "my-task" and task.attrs == {"gravity": 5.0}
    assert TaskSpec.from_json(task.to_json()) == task
    assert TaskSpec.from_proto(task.to_proto()) == task
    two = tmp_path / "two.toml"
    two.write_text(path.read_text() + '[[task]]\nid = "other"\nenv = "CartPole-v1"\n')
    with pytest.raises(InvalidTaskSpec, match="exactly one"):
        load_task_spec(two)
    with pytest.raises(InvalidTaskSpec, match="unknown suite"):
        load_suite("no-such-suite")


def test_continuous_cartpole_steps_with_bounded_force() -> None:
    env = make_env(TaskSpec(id="c", env="polyhead/ContinuousCartPole-v0"))
    try:
        env.reset(seed=0)
        obs, reward, _, truncated, _ = env.step([0.5])
        assert obs.shape == (4,) and reward == 1.0 and not truncated
    finally:
        env.close()


def test_permute_actions_rewires_the_actuator_and_rejects_bad_orders() -> None:
    plain = make_env(TaskSpec(id="a", env="Acrobot-v1"))
    rewired = make_env(
        parse_suite(
            '[[task]]\nid = "r"\nenv = "Acrobot-v1"\n[[task.wrappers]]\nname = "permute-actions"\n'
            'params = { order = "1,2,0" }\n',
            source="test",
        ).tasks[0]
    )
    try:
        plain.reset(seed=5)
        rewired.reset(seed=5)
        for action in (0, 1, 2):  # rewired action a sends the env action order[a]
            assert (plain.step((1, 2, 0)[action])[0] == rewired.step(action)[0]).all()
    finally:
        plain.close()
        rewired.close()
    for order in ("0,1", "0,0,1", "a,b,c", "0,1,3"):
        bad = parse_suite(
            '[[task]]\nid = "r"\nenv = "Acrobot-v1"\n[[task.wrappers]]\nname = "permute-actions"\n'
            f'params = {{ order = "{order}" }}\n',
            source="test",
        ).tasks[0]
        with pytest.raises(InvalidTaskSpec, match=r"must list each of 0\.\.2 once"):
            validate_task(bad)


def test_polyhead_acrobot_goal_height_and_torque_scale() -> None:
    env = make_env(
        TaskSpec(id="a", env="polyhead/Acrobot-v0", attrs={"goal_height": 1.5, "torque_scale": 0.5})
    )
    reference = make_env(TaskSpec(id="b", env="Acrobot-v1"))
    try:
        assert env.unwrapped.AVAIL_TORQUE == [-0.5, 0.0, 0.5]
        env.reset(seed=1)
        env.unwrapped.state = [3.0, 0.0, 0.0, 0.0]  # tip at 2 cos(0.14) ≈ 1.98 above the pivot
        assert env.unwrapped._terminal()
        env.unwrapped.state = [2.0, 0.0, 0.0, 0.0]  # tip at 2 cos(1.14) ≈ 0.83: below 1.5
        assert not env.unwrapped._terminal()
        # With the defaults it is Acrobot-v1.
        same = make_env(TaskSpec(id="c", env="polyhead/Acrobot-v0"))
        try:
            o1, _ = same.reset(seed=2)
            o2, _ = reference.reset(seed=2)
            assert (o1 == o2).all()
            for action in (2, 0, 1, 2):
                assert (same.step(action)[0] == reference.step(action)[0]).all()
        finally:
            same.close()
    finally:
        env.close()
        reference.close()


def test_minigrid_keys_heldout_tasks_share_the_old_heads_action_space() -> None:
    pytest.importorskip("minigrid")
    suite = load_suite("minigrid-keys")
    assert len(suite.train_tasks) == 4 and [t.id for t in suite.heldout_tasks] == ["lavagap-7", "crossing-9"]
    spaces = {t.id: validate_task(t) for t in suite.tasks}
    assert len({(obs.shape, act.n) for obs, act in spaces.values()}) == 1  # type: ignore[union-attr]


def test_minigrid_lava_loads_and_every_task_steps_through_the_cnn_view() -> None:
    pytest.importorskip("minigrid")
    suite = load_suite("minigrid-lava")
    assert [t.id for t in suite.heldout_tasks] == ["lavagap-7-mirrored", "doorkey-6x6-mirrored"]
    assert [t.id for t in suite.train_tasks] == ["lavagap-5", "lavagap-6", "empty-random-6x6", "doorkey-5x5"]
    (group,) = suite.encoders
    assert group.kind == "cnn" and set(group.tasks) == {t.id for t in suite.train_tasks}
    spaces = {t.id: validate_task(t) for t in suite.tasks}
    # One view and the same six actions everywhere: every old head can act on the held-out task.
    assert {(obs.shape, act.n) for obs, act in spaces.values()} == {((151,), 6)}  # type: ignore[union-attr]
    for task in suite.tasks:
        env = make_env(task)
        try:
            obs, _ = env.reset(seed=5)
            assert obs.shape == (151,) and obs.min() >= 0.0 and obs.max() <= 1.0
            for action in (0, 2, 1, 2, 5):  # left, forward, right, forward, toggle
                obs, reward, terminated, truncated, _ = env.step(action)
                assert obs.shape == (151,) and reward >= 0.0
                if terminated or truncated:
                    obs, _ = env.reset()
        finally:
            env.close()
