"""Resets: what a client is told when history it has, or asked for, no longer exists.

A client is never shown a silent gap or a sequence twice. When the gateway cannot go on from
the client's position, it sends ``event: reset`` (no ``id:`` line), with JSON data::

    {"reason": "trimmed", "epoch": "3f9a02bc", "_task_id": 1, "_model": "Job", "_app": "shop"}

``reason`` is a :class:`ResetReason`; ``epoch`` is the stream's epoch as the gateway knew it for
this client when it decided (on connecting: the stream's current one; on a connected client:
that of the events it was sent so far, empty after a ``lost`` reset). What follows a reset
depends on its reason; the events after it always carry ids again.

This module is the one home of the policy: when each reason is given (:func:`resume_reset` on
connecting, :func:`epoch_reset` and :func:`gap_reset` on a connected client; ``expired`` and
``lost`` where the feed meets them) and how a reset is encoded (:func:`reset_frame`).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence

from . import sse
from .codec import Frame
from .ids import EventId
from .keys import TaskRef

#: The SSE event type of a reset (reserved: a task may not send it).
RESET_EVENT = "reset"


class ResetReason(enum.StrEnum):
    """Why a client is reset; the value is what the ``reason`` field carries."""

    #: The client's events belong to a stream that no longer exists: its Last-Event-ID names
    #: another epoch than the stream's, or, on a connected client, the stream was created anew
    #: (Redis lost it) and its next event is of a new epoch. Follows: the stream from its start
    #: (its oldest retained event).
    EPOCH = "epoch"
    #: The client's Last-Event-ID is past the stream's last event: Redis lost the tail the client
    #: had seen (a failover, a restore). Follows: the stream from its start.
    POSITION = "position"
    #: Events the client lacks were trimmed away (``STREAMCOORD_MAX_STREAM_LENGTH``): on
    #: connecting, its Last-Event-ID is older than the oldest retained event; on a connected
    #: client, they went while it read a long history. Follows: the events still held after the
    #: client's position, oldest first (the outcome alone, when the stream has expired).
    TRIMMED = "trimmed"
    #: The task ended and its stream expired (``STREAMCOORD_STREAM_TTL_SECONDS``) before the
    #: state record did; given to a client connecting without a position. Follows: the
    #: terminal event, rebuilt from the state record.
    EXPIRED = "expired"
    #: Redis lost events under a connected client (a restart without persistence, a failover
    #: that lost the tail; the hub found out): what the client has may not exist any more.
    #: Follows: the stream from its start, as Redis now holds it.
    LOST = "lost"


def reset_frame(reason: ResetReason, epoch: bytes, ref: TaskRef) -> bytes:
    """The ``reset`` event (SSE bytes) of ``ref``'s stream."""
    data = {
        "reason": reason.value,
        "epoch": epoch.decode(),
        "_task_id": ref.pk_json,
        "_model": ref.model,
        "_app": ref.app_label,
    }
    return sse.encode_event(json.dumps(data, separators=(",", ":")).encode(), event=RESET_EVENT.encode())


def resume_reset(last_id: EventId, epoch: bytes, last_seq: int, page: Sequence[Frame]) -> ResetReason | None:
    """Why a client connecting with ``last_id`` cannot go on from it, or None when the stream
    holds what follows it.

    ``epoch`` and ``last_seq``: the stream's, from its state record (b"" and 0 without one);
    ``page``: the first retained frames after ``last_id.seq``, oldest first.
    """
    after = last_id.seq
    if not epoch or last_id.epoch.encode() != epoch:
        return ResetReason.EPOCH
    if after > last_seq:
        return ResetReason.POSITION
    if (page and page[0].seq > after + 1) or (not page and after < last_seq):
        return ResetReason.TRIMMED
    return None


def epoch_reset(sent_epoch: bytes, epoch: bytes) -> ResetReason | None:
    """A connected client was sent events of ``sent_epoch`` (b"": none yet, or none since a
    reset) and the hub hands it one of ``epoch``: EPOCH when the stream was created anew."""
    return ResetReason.EPOCH if sent_epoch and epoch != sent_epoch else None


def gap_reset(last: int, seq: int) -> ResetReason | None:
    """A connected client was sent up to ``last`` and the next event Redis holds is ``seq``:
    TRIMMED when events in between are gone (nothing to say before its first event)."""
    return ResetReason.TRIMMED if seq > last + 1 and last else None
