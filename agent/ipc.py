"""Framed messages between the agent's own processes (primary and replicas).

A message is a 4-byte little-endian length and a pickle (protocol 5: numpy arrays go
as raw buffers). Pickle is safe here only because both ends are this program, talking
over a socketpair the primary created for the replica it spawned: nothing else can
reach the channel. Never use this on a socket anyone else can connect to.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

_FRAME = struct.Struct("<I")
#: A frame larger than this is a bug or a corrupt stream, not a message.
MAX_FRAME = 1 << 30


class ChannelClosed(Exception):
    """The other process closed the channel (it stopped or died)."""


def encode(message: Any) -> bytes:
    """One frame: length prefix and pickle."""
    body = pickle.dumps(message, protocol=5)
    if len(body) > MAX_FRAME:
        raise ValueError(f"message of {len(body)} bytes exceeds the {MAX_FRAME} byte frame limit")
    return _FRAME.pack(len(body)) + body


async def receive(reader: asyncio.StreamReader) -> Any:
    """The next message; raises ``ChannelClosed`` at the end of the stream."""
    try:
        head = await reader.readexactly(_FRAME.size)
        (length,) = _FRAME.unpack(head)
        if length > MAX_FRAME:
            raise ChannelClosed(f"corrupt channel: frame of {length} bytes announced")
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed("the other process closed the channel") from exc
    return pickle.loads(body)  # noqa: S301 -- our own process on a private socketpair


async def send(writer: asyncio.StreamWriter, message: Any) -> None:
    """Write one message and wait until the socket buffer has room again."""
    if writer.is_closing():
        raise ChannelClosed("the channel is closed")
    writer.write(encode(message))
    try:
        await writer.drain()
    except ConnectionError as exc:
        raise ChannelClosed("the other process closed the channel") from exc


async def open_channel(fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over an inherited socket file descriptor (a socketpair end)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME)
