"""A connection closed under a command, as redis-py 8.1 reports it (an AttributeError or
TypeError from its transport code, redis/redis-py#4287) or uvloop does (a RuntimeError: the
handler is closed; seen in a slot migration), becomes the ConnectionError our retries handle;
the same errors from anywhere else stay what they are."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from streamcoord.connection import _connection_errors, torn_down


def raiser(filename: str, statement: str) -> Any:
    """A function that runs ``statement`` as if it were code of ``filename``."""
    namespace: dict[str, Any] = {}
    exec(compile(f"def fail():\n    {statement}\n", filename, "exec"), namespace)
    return namespace["fail"]


IN_REDIS_PY = raiser("/venv/site-packages/redis/asyncio/connection.py", "None.writelines([])")
IN_ASYNCIO = raiser("/usr/lib/python3.11/asyncio/selector_events.py", "callback = None; callback()")
IN_UVLOOP = raiser(
    "uvloop/handles/handle.pyx",
    "raise RuntimeError('unable to perform operation on <TCPTransport closed=True>; the handler is closed')",
)
IN_OUR_CODE = raiser("/work/streamcoord/eventlog.py", "None.writelines([])")


@pytest.mark.parametrize("fail", [IN_REDIS_PY, IN_ASYNCIO, IN_UVLOOP])
def test_an_error_of_the_transport_is_a_connection_error(fail: Any) -> None:
    with pytest.raises(RedisConnectionError, match="connection closed under a command"), _connection_errors():
        fail()


def test_the_same_error_in_our_code_is_left_alone() -> None:
    with pytest.raises(AttributeError), _connection_errors():
        IN_OUR_CODE()
    try:
        IN_OUR_CODE()
    except AttributeError as exc:
        assert not torn_down(exc)
