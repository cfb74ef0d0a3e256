"""The Lua scripts: one ``.lua`` file each, beside this module, its contract at its top.

Every change to a task's state record is one of these scripts, so it is atomic on that one key
(one hash slot): ``append`` (events), and for the job queue ``start``, ``job_added``,
``start_failed``, ``begin``, ``renew``, ``recover``, ``hand_back``, ``cancel``, ``retry``,
``forget`` and ``finish_if_ours``. The names they write are defined in :mod:`streamcoord.taskstate`.
"""

from __future__ import annotations

import functools
import importlib.resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


@functools.cache
def source(name: str) -> str:
    """The text of ``<name>.lua``."""
    return importlib.resources.files(__package__).joinpath(f"{name}.lua").read_text()


def register(redis: Redis, name: str) -> AsyncScript:
    """``<name>.lua`` bound to a client (EVALSHA, loaded again after NOSCRIPT)."""
    return redis.register_script(source(name))
