"""The rollout guard's statistics, re-exported from :mod:`polyhead.stats`.

The Mann-Whitney shift test, written here first for the guard, now lives once in the contract layer
(numpy only) because the server's live-return monitor (:mod:`polyhead.livewatch`, no torch in the serving
image) and ``polyhead operate`` use it too. Import either name; they are the same objects.
"""

from __future__ import annotations

from polyhead.stats import ShiftTest, mann_whitney_less, rankdata, relative_margin, worse_than

__all__ = ["ShiftTest", "mann_whitney_less", "rankdata", "relative_margin", "worse_than"]
