"""The event loop the daemon and its replicas run on (``[server] event_loop``).

uvloop runs asyncio's loop on libuv: its transports, timers and callback queue are C, so
each request costs fewer Python-level steps than with the standard library's selector loop
(README "Performance" has the figures). ``asyncio`` keeps the standard loop, for a platform
uvloop does not support or to rule it out when chasing a problem.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from agent.config import EventLoop

T = TypeVar("T")


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """A constructor of the configured loop."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: EventLoop) -> T:
    """``asyncio.run`` on the configured loop."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)


def running_kind() -> str:
    """Which loop runs this coroutine ("uvloop" or "asyncio"), for the log."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
