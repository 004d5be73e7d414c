"""The real ``cent`` package (Centrifugo's server API client) against ``eventcast serve``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from cent import (
    AsyncClient,
    BroadcastRequest,
    Client,
    HistoryRequest,
    InfoRequest,
    PublishRequest,
    StreamPosition,
)
from cent.exceptions import CentApiResponseError, CentTransportError, CentUnauthorizedError
from websockets.sync.client import connect as ws_connect

from .hubtools import API_KEY, WAIT, HubServer, token


@pytest.fixture
def cent(hub_process: HubServer) -> Iterator[Client]:
    with Client(api_url=hub_process.api_url, api_key=API_KEY, timeout=WAIT) as client:
        yield client


def test_publish_returns_offset_and_epoch(cent: Client) -> None:
    first = cent.publish(PublishRequest(channel="cent.publish", data={"n": 1}))
    second = cent.publish(PublishRequest(channel="cent.publish", data={"n": 2}, tags={"k": "v"}))
    assert first.offset == 1
    assert second.offset == 2
    assert first.epoch
    assert second.epoch == first.epoch
    # A channel without history: no position.
    live = cent.publish(PublishRequest(channel="live:cent", data={"n": 1}))
    assert (live.offset, live.epoch) == (0, "")


def test_broadcast_to_two_channels(cent: Client) -> None:
    result = cent.broadcast(
        BroadcastRequest(channels=["cent.bc1", "cent.bc2"], data={"hello": "both"})
    )
    assert len(result.responses) == 2
    assert all(response.error is None for response in result.responses)
    assert [r.result.offset for r in result.responses if r.result] == [1, 1]
    for channel in ("cent.bc1", "cent.bc2"):
        history = cent.history(HistoryRequest(channel=channel, limit=10))
        assert [(p.offset, p.data) for p in history.publications] == [(1, {"hello": "both"})]


def test_broadcast_reports_errors_per_channel(cent: Client) -> None:
    result = cent.broadcast(
        BroadcastRequest(channels=["cent.bc-ok", "nowhere:chan", "bad..name"], data={"x": 1})
    )
    ok, unknown, invalid = result.responses
    assert ok.error is None
    assert ok.result is not None
    assert ok.result.offset == 1
    assert unknown.error is not None
    assert unknown.error.code == 102
    assert invalid.error is not None
    assert invalid.error.code == 107


def test_history_pages(cent: Client) -> None:
    channel = "cent.history"
    epoch = ""
    for n in range(1, 6):
        epoch = cent.publish(PublishRequest(channel=channel, data={"n": n})).epoch

    everything = cent.history(HistoryRequest(channel=channel, limit=100))
    assert (everything.offset, everything.epoch) == (5, epoch)
    assert [(p.offset, p.data) for p in everything.publications] == [
        (n, {"n": n}) for n in range(1, 6)
    ]

    position = cent.history(HistoryRequest(channel=channel))
    assert (position.publications, position.offset, position.epoch) == ([], 5, epoch)

    since = cent.history(
        HistoryRequest(channel=channel, limit=2, since=StreamPosition(offset=2, epoch=epoch))
    )
    assert [p.offset for p in since.publications] == [3, 4]

    newest = cent.history(HistoryRequest(channel=channel, limit=2, reverse=True))
    assert [p.offset for p in newest.publications] == [5, 4]

    with pytest.raises(CentApiResponseError) as wrong_epoch:
        cent.history(
            HistoryRequest(channel=channel, limit=2, since=StreamPosition(offset=2, epoch="nope"))
        )
    assert wrong_epoch.value.code == 112


def test_history_without_history_is_not_available(cent: Client) -> None:
    with pytest.raises(CentApiResponseError) as error:
        cent.history(HistoryRequest(channel="live:no-history", limit=10))
    assert error.value.code == 108
    with pytest.raises(CentApiResponseError) as unknown:
        cent.history(HistoryRequest(channel="nowhere:chan", limit=10))
    assert unknown.value.code == 102


def test_info_counts_clients(cent: Client, hub_process: HubServer) -> None:
    before = cent.info(InfoRequest()).nodes
    assert len(before) == 1
    assert before[0].name == "test-node"
    with ws_connect(hub_process.ws_url, open_timeout=WAIT) as ws:
        ws.send(json.dumps({"id": 1, "connect": {"token": token("info-user")}}))
        ws.send(json.dumps({"id": 2, "subscribe": {"channel": "cent.info"}}))
        replies: dict[int, dict[str, object]] = {}
        while len(replies) < 2:
            for line in str(ws.recv(timeout=WAIT)).split("\n"):
                message = json.loads(line)
                replies[message["id"]] = message
        assert "connect" in replies[1]
        assert "subscribe" in replies[2]
        node = cent.info(InfoRequest()).nodes[0]
        assert node.num_clients == before[0].num_clients + 1
        assert node.num_users == before[0].num_users + 1
        assert node.num_subs == before[0].num_subs + 1
        assert node.num_channels >= 1
        assert node.uptime >= 0
        assert node.version


def test_wrong_api_key_is_unauthorized(hub_process: HubServer) -> None:
    with Client(api_url=hub_process.api_url, api_key="not-the-key", timeout=WAIT) as client:
        with pytest.raises(CentUnauthorizedError):
            client.publish(PublishRequest(channel="cent.nope", data={}))
        with pytest.raises(CentUnauthorizedError):
            client.info(InfoRequest())


def test_unknown_method_is_a_transport_error(hub_process: HubServer) -> None:
    client = Client(api_url=hub_process.base + "/api/nope", api_key=API_KEY, timeout=WAIT)
    with client, pytest.raises(CentTransportError) as error:
        client.info(InfoRequest())  # POST /api/nope/info: no such route
    assert error.value.status_code == 404


async def test_async_client(hub_process: HubServer) -> None:
    client = AsyncClient(api_url=hub_process.api_url, api_key=API_KEY, timeout=WAIT)
    try:
        published = await client.publish(PublishRequest(channel="cent.async", data=[1, "two"]))
        assert published.offset == 1
        history = await client.history(HistoryRequest(channel="cent.async", limit=1))
        assert [(p.offset, p.data) for p in history.publications] == [(1, [1, "two"])]
        assert history.epoch == published.epoch
        with pytest.raises(CentApiResponseError) as error:
            await client.history(HistoryRequest(channel="live:async", limit=1))
        assert error.value.code == 108
    finally:
        await client.close()
