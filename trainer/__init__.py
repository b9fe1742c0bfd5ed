"""The trainer: the shared-trunk multi-head policy, multi-task PPO, and ONNX export into a bundle.

Modules, one job each:

* :mod:`trainer.policy`: ``PolicyConfig`` and ``MultiTaskPolicy`` (normaliser + trunk + per-task heads),
  the trunk checkpoint format and ``load_policy``;
* :mod:`trainer.export`: ONNX export of the trunk and heads, the torch-vs-onnxruntime parity check, and
  writing a bundle;
* :mod:`trainer.config`: ``PPOConfig``, the frozen, documented training settings (the ``--help``);
* :mod:`trainer.envs`: the per-task vectorised environments the rollout steps;
* :mod:`trainer.gae`: generalised advantage estimation;
* :mod:`trainer.pcgrad`: gradient surgery and the task-gradient cosine matrix;
* :mod:`trainer.ppo`: the rollout, GAE and update phases of multi-task PPO, and the training loop;
* :mod:`trainer.evaluate`: deterministic per-task evaluation;
* :mod:`trainer.commands`: the ``polyhead train`` subcommand.
"""
