"""The lean backplane readers' parsers, fed byte by byte (no server needed)."""

from __future__ import annotations

from typing import Any

from eventcast.backplane import _nats_sub, _redis_sub


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def _feed_in_pieces(protocol: Any, data: bytes, size: int) -> None:
    for i in range(0, len(data), size):
        protocol.data_received(data[i : i + size])


async def test_nats_frames_split_anywhere_give_every_payload_once():
    batches: list[list[bytes]] = []
    protocol = _nats_sub._Protocol(lambda batch: batches.append(list(batch)))
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    stream = (
        b'INFO {"server_id":"x"}\r\n'
        b"MSG ec.~.a 1 5\r\nhello\r\n"
        b"PING\r\n"
        b"MSG ec.~.b 1 reply.to 11\r\nwith\r\nCRLF!\r\n"
        b"MSG ec.~.c 2 0\r\n\r\n"
    )
    for size in (1, 3, 7, len(stream)):
        batches.clear()
        transport.written.clear()
        protocol._buffer.clear()
        _feed_in_pieces(protocol, stream, size)
        payloads = [p for batch in batches for p in batch]
        assert payloads == [b"hello", b"with\r\nCRLF!", b""]
        assert transport.written == [b"PONG\r\n"]
        assert not protocol._buffer
    assert protocol.info.done()


async def test_nats_errors_reach_the_pong_queue():
    protocol = _nats_sub._Protocol(lambda batch: None)
    protocol.connection_made(_Transport())  # type: ignore[arg-type]
    protocol.data_received(b"-ERR 'Authorization Violation'\r\n")
    assert protocol.replies.get_nowait().startswith(b"-ERR")


async def test_redis_pushes_split_anywhere_give_every_payload_once():
    batches: list[list[bytes]] = []
    protocol = _redis_sub._Protocol(lambda batch: batches.append(list(batch)))
    protocol.connection_made(_Transport())  # type: ignore[arg-type]
    stream = (
        b"*3\r\n$9\r\nsubscribe\r\n$4\r\nec:a\r\n:1\r\n"
        b"*3\r\n$7\r\nmessage\r\n$4\r\nec:a\r\n$5\r\nhello\r\n"
        b"*4\r\n$8\r\npmessage\r\n$4\r\nec:*\r\n$4\r\nec:b\r\n$3\r\nabc\r\n"
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    )
    for size in (1, 5, len(stream)):
        batches.clear()
        _feed_in_pieces(protocol, stream, size)
        assert [p for batch in batches for p in batch] == [b"hello", b"abc"]
    assert protocol.replies.qsize() == 3  # one pong per pass


def test_resp_command_encoding():
    assert _redis_sub.command("SUBSCRIBE", "ec:a") == b"*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nec:a\r\n"
    assert _redis_sub.command("PING") == b"*1\r\n$4\r\nPING\r\n"
