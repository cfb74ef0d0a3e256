"""Redis hears of a row only once the row is committed.

A post_save handler, or a start asked for inside ``transaction.atomic``, runs before the commit:
told at once, Redis would know of rows that are rolled back, and a worker could take a task
whose row it cannot see yet. So such calls wait for the commit (``transaction.on_commit``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import transaction
from redis.exceptions import RedisError

from streamcoord.errors import StreamcoordError

log = logging.getLogger(__name__)


def in_transaction(using: str) -> bool:
    """Whether the caller is inside ``transaction.atomic`` on the database ``using``."""
    return transaction.get_connection(using).in_atomic_block


def after_commit(call: Callable[[], object], using: str, what: str) -> None:
    """Run ``call`` once the transaction on ``using`` commits, or now outside one (autocommit;
    in manual mode, ``set_autocommit(False)``, there is no commit to wait for either). A failure
    is logged, naming ``what``, never raised: the rows are committed by then, and an exception
    from a commit hook would come out of the ``atomic`` block after the commit, as if it had
    failed."""

    def run() -> None:
        try:
            call()
        except (RedisError, OSError, TimeoutError, StreamcoordError) as exc:
            log.warning("could not %s in Redis: %s", what, exc)

    if in_transaction(using):
        transaction.on_commit(run, using=using, robust=True)
    else:
        run()
