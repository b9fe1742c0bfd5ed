"""The online updater's parts (``polyhead adapt``; the orchestration is :mod:`trainer.adapt`).

* :mod:`~trainer.updater.config`: ``AdaptConfig``, the run's frozen settings;
* :mod:`~trainer.updater.frozen`: freezing the trunk and the fingerprints that prove it did not move;
* :mod:`~trainer.updater.floor`: old heads evaluated zero-shot on the new task ("nearest" by behaviour);
* :mod:`~trainer.updater.head_ppo`: head-only PPO: local rollouts, batches from remote segments, update;
* :mod:`~trainer.updater.control`: the server's HeadAdmin calls and the experience feed;
* :mod:`~trainer.updater.publisher`: export, parity check, atomic bundle write, server load;
* :mod:`~trainer.updater.guard`: the guarded rollout (live returns, automatic rollback);
* :mod:`~trainer.updater.metrics`: ``polyhead_updater_*`` metrics on an injected registry;
* :mod:`~trainer.updater.progress`: the progress bar.
"""
