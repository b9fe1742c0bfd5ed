"""The trainer: the shared-trunk multi-head policy, multi-task PPO, and ONNX export into a bundle.

Modules, one job each:

* :mod:`polyhead.trainer.policy`: ``PolicyConfig`` and ``MultiTaskPolicy`` (normaliser + trunk + per-task
  heads), the trunk checkpoint format and ``load_policy``;
* :mod:`polyhead.trainer.export`: ONNX export of the trunk and heads, the torch-vs-onnxruntime parity check,
  and writing a bundle;
* :mod:`polyhead.trainer.config`: ``PPOConfig``, the frozen, documented training settings (the ``--help``);
* :mod:`polyhead.trainer.envs`: the per-task vectorised environments the rollout steps;
* :mod:`polyhead.trainer.gae`: generalised advantage estimation;
* :mod:`polyhead.trainer.pcgrad`: gradient surgery and the task-gradient cosine matrix;
* :mod:`polyhead.trainer.ppo`: the rollout, GAE and update phases of multi-task PPO, and the training loop;
* :mod:`polyhead.trainer.evaluate`: deterministic per-task evaluation;
* :mod:`polyhead.trainer.commands`: the ``polyhead train`` subcommand.
"""
