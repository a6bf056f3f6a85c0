"""The event loop the daemon and its replicas run on (``[server] event_loop``).

uvloop runs asyncio's loop on libuv: its transports, timers and callback queue are C, so
each request costs fewer Python-level steps than with the standard library's selector loop
(README "Performance" has the figures). ``asyncio`` keeps the standard loop, for a platform
uvloop does not support or to rule it out when chasing a problem.

One difference matters to us: uvloop's timers have millisecond resolution (libuv rounds a
delay to the nearest millisecond), so a wait of a fraction of a millisecond may end early;
code that needs a deadline re-checks the clock after a timeout (``Batcher._wait_to_fill``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from agent.config import Config, EventLoop
from agent.errors import ConfigProblem

T = TypeVar("T")


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """A constructor of the configured loop.

    Raises:
        ImportError: ``uvloop`` is configured but cannot be imported.
    """
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def problems(config: Config) -> list[ConfigProblem]:
    """What stops the configured loop from running here (for the preflight and
    ``check-config``)."""
    try:
        loop_factory(config.server.event_loop)
    except ImportError as exc:
        return [
            ConfigProblem(
                "server.event_loop",
                0,
                f"uvloop cannot be imported ({exc}); install it (pip install uvloop) "
                'or set event_loop = "asyncio"',
            )
        ]
    return []


def run(kind: EventLoop, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())`` on the configured loop (``main`` is called once the loop
    exists, so a loop that cannot start leaves no coroutine unawaited)."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main())


def running_kind() -> str:
    """Which loop runs this coroutine ("uvloop" or "asyncio"), for the log."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
