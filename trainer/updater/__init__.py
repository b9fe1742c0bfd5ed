"""The online updater's parts (``polyhead adapt``; the orchestration is :mod:`polyhead.trainer.adapt`).

* :mod:`~polyhead.trainer.updater.config`: ``AdaptConfig``, the run's frozen settings;
* :mod:`~polyhead.trainer.updater.frozen`: freezing the trunk and the fingerprints that prove it did not move;
* :mod:`~polyhead.trainer.updater.floor`: old heads evaluated zero-shot on the new task ("nearest" by
  behaviour);
* :mod:`~polyhead.trainer.updater.head_ppo`: head-only PPO: local rollouts, batches from remote segments,
  update;
* :mod:`~polyhead.trainer.updater.control`: the server's HeadAdmin calls and the experience feed;
* :mod:`~polyhead.trainer.updater.publisher`: export, parity check, atomic bundle write, server load;
* :mod:`~polyhead.trainer.updater.guard`: the guarded rollout (live returns, automatic rollback);
* :mod:`~polyhead.trainer.updater.metrics`: ``polyhead_updater_*`` metrics on an injected registry;
* :mod:`~polyhead.trainer.updater.progress`: the progress bar.
"""
