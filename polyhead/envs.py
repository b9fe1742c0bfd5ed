"""Building a task's gymnasium environment from its TaskSpec, and the project wrappers.

gymnasium is imported lazily: the contract layer stays importable in a client install without it. The
trainer, the online updater and ``polyhead simulate`` all build environments here, so a task means the
same thing everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from polyhead.errors import InvalidTaskSpec
from polyhead.spaces import SpaceSpec, space_from_gymnasium
from polyhead.taskspec import TaskSpec

CONTINUOUS_CARTPOLE_ID = "polyhead/ContinuousCartPole-v0"
ACROBOT_ID = "polyhead/Acrobot-v0"


# --- derived physics ------------------------------------------------------------------------------------
def _recompute_cartpole(env: Any) -> None:
    # CartPoleEnv computes these once in __init__; changing masses or length must refresh them.
    env.total_mass = env.masspole + env.masscart
    env.polemass_length = env.masspole * env.length


# Keyed by class name anywhere in the unwrapped env's MRO.
DERIVED_PHYSICS: dict[str, Callable[[Any], None]] = {"CartPoleEnv": _recompute_cartpole}


# --- project wrappers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    kind: type
    default: Any = None
    required: bool = False
    help: str = ""


@dataclass(frozen=True)
class WrapperDef:
    """A registered wrapper: its factory, its parameters and what it does."""

    factory: Callable[..., Any]
    params: dict[str, Param]
    help: str


def _target_position(env: Any, target: float, weight: float, index: int) -> Any:
    import gymnasium as gym

    class TargetPositionReward(gym.Wrapper):
        """Adds ``-weight * min(1, |obs[index] - target| / scale)`` per step: hold the cart near a target.

        The scale is CartPole's track half-width (2.4) when present, else 1.
        """

        def __init__(self, inner: Any) -> None:
            super().__init__(inner)
            self.scale = float(getattr(inner.unwrapped, "x_threshold", 1.0))

        def step(self, action: Any) -> Any:
            obs, reward, terminated, truncated, info = self.env.step(action)
            distance = min(1.0, abs(float(np.asarray(obs).ravel()[index]) - target) / self.scale)
            info["target_distance"] = distance
            return obs, float(reward) - weight * distance, terminated, truncated, info

    return TargetPositionReward(env)


def _reverse_action(env: Any) -> Any:
    import gymnasium as gym

    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        n, start = int(space.n), int(space.start)
        return gym.wrappers.TransformAction(env, lambda a: start + (n - 1 - (int(a) - start)), space)
    if isinstance(space, gym.spaces.Box):
        return gym.wrappers.TransformAction(env, lambda a: -np.asarray(a, dtype=space.dtype), space)
    raise InvalidTaskSpec(f"wrapper 'reverse-action' supports Discrete and Box actions, not {space}")


def _permute_actions(env: Any, order: str) -> Any:
    import gymnasium as gym

    space = env.action_space
    if not isinstance(space, gym.spaces.Discrete):
        raise InvalidTaskSpec(f"wrapper 'permute-actions' supports Discrete actions, not {space}")
    n, start = int(space.n), int(space.start)
    try:
        mapping = [int(part) for part in order.split(",")]
    except ValueError:
        mapping = []
    if sorted(mapping) != list(range(n)):
        raise InvalidTaskSpec(
            f"wrapper 'permute-actions': parameter 'order' must list each of 0..{n - 1} once, "
            f"comma-separated (e.g. {','.join(str(i) for i in reversed(range(n)))!r}), got {order!r}"
        )
    return gym.wrappers.TransformAction(env, lambda a: start + mapping[int(a) - start], space)


def _scale_reward(env: Any, scale: float) -> Any:
    import gymnasium as gym

    return gym.wrappers.TransformReward(env, lambda r: scale * float(r))


def _minigrid_flat(env: Any, actions: int) -> Any:
    import gymnasium as gym

    class FlatEgocentricView(gym.ObservationWrapper):
        """MiniGrid's 7x7x3 egocentric view plus a one-hot direction as one flat float vector (/10)."""

        def __init__(self, inner: Any) -> None:
            super().__init__(inner)
            image = inner.observation_space["image"]
            size = int(np.prod(image.shape)) + 4
            self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(size,), dtype=np.float32)
            if actions > 0:
                self.action_space = gym.spaces.Discrete(min(actions, int(inner.action_space.n)))

        def observation(self, observation: Any) -> Any:
            image = np.asarray(observation["image"], dtype=np.float32).ravel() / 10.0
            direction = np.zeros(4, dtype=np.float32)
            direction[int(observation["direction"]) % 4] = 1.0
            return np.concatenate([image, direction])

    return FlatEgocentricView(env)


WRAPPERS: dict[str, WrapperDef] = {
    "target-position": WrapperDef(
        _target_position,
        {
            "target": Param(float, required=True, help="target value of the observation element"),
            "weight": Param(float, default=0.3, help="penalty per step at full distance"),
            "index": Param(int, default=0, help="observation element to steer (0: CartPole's cart x)"),
        },
        "reward term for holding an observation element (the cart) near a target",
    ),
    "reverse-action": WrapperDef(_reverse_action, {}, "reversed actuator: Discrete a -> n-1-a, Box a -> -a"),
    "permute-actions": WrapperDef(
        _permute_actions,
        {
            "order": Param(
                str, required=True, help="the env action each action index sends, e.g. '1,2,0': 0 -> 1"
            )
        },
        "rewired actuator: Discrete action i is sent to the env as order[i]",
    ),
    "scale-reward": WrapperDef(
        _scale_reward, {"scale": Param(float, required=True, help="reward multiplier")}, "multiply rewards"
    ),
    "minigrid-flat": WrapperDef(
        _minigrid_flat,
        {"actions": Param(int, default=3, help="keep the first N actions (3: left, right, forward); 0 all")},
        "MiniGrid egocentric image + direction as a flat Box (needs polyhead[minigrid])",
    ),
}


def _check_params(task: TaskSpec, index: int, name: str, params: dict[str, Any]) -> dict[str, Any]:
    where = f"task {task.id!r}: field 'wrappers[{index}]' ({name!r})"
    definition = WRAPPERS.get(name)
    if definition is None:
        raise InvalidTaskSpec(f"{where}: unknown wrapper; known wrappers: {', '.join(sorted(WRAPPERS))}")
    unknown = sorted(set(params) - set(definition.params))
    if unknown:
        raise InvalidTaskSpec(
            f"{where}: unknown parameter(s) {unknown}; expected {sorted(definition.params) or 'none'}"
        )
    out: dict[str, Any] = {}
    for pname, p in definition.params.items():
        if pname not in params:
            if p.required:
                raise InvalidTaskSpec(f"{where}: missing parameter {pname!r} ({p.kind.__name__}: {p.help})")
            out[pname] = p.default
            continue
        value = params[pname]
        if p.kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            out[pname] = float(value)
        elif (p.kind is int and isinstance(value, int) and not isinstance(value, bool)) or (
            p.kind is str and isinstance(value, str)
        ):
            out[pname] = value
        else:
            raise InvalidTaskSpec(f"{where}: parameter {pname!r} must be {p.kind.__name__}, got {value!r}")
    return out


# --- the continuous-force CartPole ----------------------------------------------------------------------
_registered = False


def register_envs() -> None:
    """Register polyhead's own gymnasium ids (idempotent)."""
    global _registered
    if _registered:
        return
    import gymnasium as gym

    if ACROBOT_ID not in gym.registry:
        gym.register(
            id=ACROBOT_ID,
            entry_point="polyhead.envs:AcrobotEnv",
            max_episode_steps=500,
            reward_threshold=-100.0,
        )
    if CONTINUOUS_CARTPOLE_ID not in gym.registry:
        gym.register(
            id=CONTINUOUS_CARTPOLE_ID,
            entry_point="polyhead.envs:ContinuousCartPoleEnv",
            max_episode_steps=500,
            reward_threshold=475.0,
        )
    _registered = True


def __getattr__(name: str) -> Any:
    # The class needs gymnasium at definition time; build it only when gymnasium's registry asks for it.
    if name == "ContinuousCartPoleEnv":
        return _continuous_cartpole_class()
    if name == "AcrobotEnv":
        return _acrobot_class()
    raise AttributeError(name)


_ACROBOT_CLS: Any = None


def _acrobot_class() -> Any:
    global _ACROBOT_CLS
    if _ACROBOT_CLS is not None:
        return _ACROBOT_CLS
    from gymnasium.envs.classic_control.acrobot import AcrobotEnv as GymAcrobotEnv

    class AcrobotEnv(GymAcrobotEnv):
        """Acrobot-v1 with two more physics attributes a task spec can set (``attrs``).

        * ``goal_height``: the episode ends when the tip rises above this height over the pivot, in link
          lengths, ``-cos(θ1) - cos(θ1 + θ2) > goal_height`` (Acrobot-v1: 1.0; the tip can reach 2.0).
        * ``torque_scale``: the elbow torques are ``(-s, 0, +s)`` (Acrobot-v1: s = 1).

        With both at their defaults it is Acrobot-v1: same observations, dynamics and -1 per step.
        """

        goal_height: float = 1.0
        torque_scale: float = 1.0

        @property
        def AVAIL_TORQUE(self) -> list[float]:  # type: ignore[override]  # noqa: N802  # read by step()
            return [-self.torque_scale, 0.0, self.torque_scale]

        def _terminal(self) -> bool:
            s = self.state
            assert s is not None, "Call reset before using AcrobotEnv object."
            return bool(-math.cos(s[0]) - math.cos(s[1] + s[0]) > self.goal_height)

    _ACROBOT_CLS = AcrobotEnv
    return _ACROBOT_CLS


_CONTINUOUS_CLS: Any = None


def _continuous_cartpole_class() -> Any:
    global _CONTINUOUS_CLS
    if _CONTINUOUS_CLS is not None:
        return _CONTINUOUS_CLS
    import gymnasium as gym
    from gymnasium.envs.classic_control.cartpole import CartPoleEnv

    class ContinuousCartPoleEnv(CartPoleEnv):
        """CartPole with a continuous force: action a in [-1, 1] pushes with ``a * force_mag``.

        Same observations, termination and +1 reward as CartPole-v1; the physics are CartPole's
        semi-implicit or Euler update with the force made continuous.
        """

        def __init__(self, render_mode: str | None = None) -> None:
            super().__init__(render_mode=render_mode)
            self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

        def step(self, action: Any) -> Any:
            assert self.state is not None, "Call reset before using step method."
            a = float(np.clip(np.asarray(action, dtype=np.float64).ravel()[0], -1.0, 1.0))
            x, x_dot, theta, theta_dot = self.state
            force = a * self.force_mag
            costheta, sintheta = math.cos(theta), math.sin(theta)
            temp = (force + self.polemass_length * theta_dot**2 * sintheta) / self.total_mass
            thetaacc = (self.gravity * sintheta - costheta * temp) / (
                self.length * (4.0 / 3.0 - self.masspole * costheta**2 / self.total_mass)
            )
            xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
            if self.kinematics_integrator == "euler":
                x, x_dot = x + self.tau * x_dot, x_dot + self.tau * xacc
                theta, theta_dot = theta + self.tau * theta_dot, theta_dot + self.tau * thetaacc
            else:
                x_dot = x_dot + self.tau * xacc
                x = x + self.tau * x_dot
                theta_dot = theta_dot + self.tau * thetaacc
                theta = theta + self.tau * theta_dot
            self.state = np.array((x, x_dot, theta, theta_dot), dtype=np.float64)
            terminated = bool(abs(x) > self.x_threshold or abs(theta) > self.theta_threshold_radians)
            return np.array(self.state, dtype=np.float32), 1.0, terminated, False, {}

    _CONTINUOUS_CLS = ContinuousCartPoleEnv
    return _CONTINUOUS_CLS


# --- construction -----------------------------------------------------------------------------------------
def _apply_attrs(task: TaskSpec, env: Any) -> None:
    unwrapped = env.unwrapped
    for name, value in task.attrs.items():
        where = f"task {task.id!r}: field 'attrs.{name}'"
        if name.startswith("_") or not hasattr(unwrapped, name):
            raise InvalidTaskSpec(f"{where}: {type(unwrapped).__name__} has no attribute {name!r}")
        current = getattr(unwrapped, name)
        if callable(current):
            raise InvalidTaskSpec(f"{where}: {name!r} is a method, not a physics attribute")
        if isinstance(current, bool):
            ok = isinstance(value, bool)
        elif isinstance(current, int | float | np.number):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(current, str):
            ok = isinstance(value, str)
        else:
            raise InvalidTaskSpec(
                f"{where}: attribute of type {type(current).__name__} cannot be set from a task spec "
                "(numbers, booleans and strings only)"
            )
        if ok and type(current) is int and isinstance(value, float) and not value.is_integer():
            ok = False
        if not ok:
            raise InvalidTaskSpec(
                f"{where}: expected {type(current).__name__} like the current value {current!r}, "
                f"got {value!r}"
            )
        setattr(unwrapped, name, type(current)(value) if not isinstance(current, np.number) else value)
    if task.attrs:
        for cls in type(unwrapped).__mro__:
            hook = DERIVED_PHYSICS.get(cls.__name__)
            if hook is not None:
                hook(unwrapped)
                break


def make_env(task: TaskSpec, *, render_mode: str | None = None) -> Any:
    """Build the task's environment: ``gymnasium.make`` with its kwargs, attrs, then wrappers in order.

    Raises InvalidTaskSpec naming the task and field when any step fails.
    """
    try:
        import gymnasium as gym
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InvalidTaskSpec(
            f"task {task.id!r}: building environments needs gymnasium (pip install 'polyhead[client]')"
        ) from exc
    register_envs()
    if task.env.startswith("MiniGrid"):
        try:
            import minigrid  # noqa: F401  # registers the MiniGrid ids
        except ImportError as exc:
            raise InvalidTaskSpec(
                f"task {task.id!r}: field 'env' {task.env!r} needs the minigrid extra "
                "(pip install 'polyhead[minigrid]')"
            ) from exc
    if task.env not in gym.registry:
        raise InvalidTaskSpec(f"task {task.id!r}: field 'env': unknown gymnasium environment id {task.env!r}")
    kwargs = dict(task.kwargs)
    if task.max_episode_steps:
        kwargs["max_episode_steps"] = task.max_episode_steps
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        env = gym.make(task.env, **kwargs)
    except TypeError as exc:
        raise InvalidTaskSpec(f"task {task.id!r}: field 'kwargs': {exc}") from exc
    try:
        _apply_attrs(task, env)
        for i, w in enumerate(task.wrappers):
            params = _check_params(task, i, w.name, w.params)
            env = WRAPPERS[w.name].factory(env, **params)
    except BaseException:
        env.close()
        raise
    return env


def task_spaces(task: TaskSpec) -> tuple[SpaceSpec, SpaceSpec]:
    """The (observation, action) spaces of a task's environment, built once and closed."""
    env = make_env(task)
    try:
        return space_from_gymnasium(env.observation_space), space_from_gymnasium(env.action_space)
    except Exception as exc:
        raise InvalidTaskSpec(f"task {task.id!r}: {exc}") from exc
    finally:
        env.close()


def validate_task(task: TaskSpec) -> tuple[SpaceSpec, SpaceSpec]:
    """Build, reset and step the environment once; raise InvalidTaskSpec on any problem.

    Returns its (observation, action) spaces. Used before training so a bad spec fails in seconds.
    """
    env = make_env(task)
    try:
        obs_space = space_from_gymnasium(env.observation_space)
        act_space = space_from_gymnasium(env.action_space)
        env.reset(seed=0)
        env.step(env.action_space.sample())
    except InvalidTaskSpec:
        raise
    except Exception as exc:
        raise InvalidTaskSpec(f"task {task.id!r}: the environment failed to reset/step: {exc}") from exc
    finally:
        env.close()
    return obs_space, act_space
