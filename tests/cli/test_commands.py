"""The hub commands run in-process (``main([...])``) against a real in-process hub."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from eventcast.subscription import Overflow
from tests.server.hubtools import SECRET, HubServer, free_port, token

from .clitools import api_args, assert_one_error_line, run_main

COMMANDS = [
    ["publish"],
    ["tail"],
    ["history"],
    ["bench"],
    ["dead-letters", "list"],
    ["dead-letters", "redrive"],
]


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def expired_token() -> str:
    past = int(time.time()) - 3600
    return jwt.encode({"sub": "alice", "iat": past - 60, "exp": past}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_examples_and_exit_codes(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from eventcast.cli import main

    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples" in out
    assert f"eventcast {' '.join(command)}" in out
    assert "Exit codes" in out
    assert "130" in out


def test_root_help_lists_the_hub_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from eventcast.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("publish", "tail", "history", "bench", "dead-letters", "serve", "token"):
        assert name in out


async def test_publish_prints_the_position_and_history_shows_it(
    hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_main(["publish", "news.eu", '{"title": "hello"}', *api_args(hub.base)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    epoch = (await hub.api("history", channel="news.eu"))["epoch"]
    assert "published to news.eu at offset 1" in out
    assert f"1:{epoch}" in out

    assert await run_main(["history", "news.eu", "--json", *api_args(hub.base)]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert rows == [{"topic": "news.eu", "offset": 1, "epoch": epoch, "data": {"title": "hello"}}]

    assert await run_main(["history", "news.eu", *api_args(hub.base)]) == 0
    table = capsys.readouterr().out
    assert '{"title":"hello"}' in table
    assert f"top position 1:{epoch}" in table


async def test_publish_json_output_and_idempotency_key(
    hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["publish", "orders.1", '"shipped"', "--idempotency-key", "k1", "--json"]
    assert await run_main([*argv, *api_args(hub.base)]) == 0
    first = json_lines(capsys.readouterr().out)
    assert await run_main([*argv, *api_args(hub.base)]) == 0
    second = json_lines(capsys.readouterr().out)
    assert first == second
    assert first[0]["offset"] == 1
    history = await hub.api("history", channel="orders.1", limit=10)
    assert len(history["publications"]) == 1


async def test_publish_from_stdin_lines(
    hub: HubServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"n": 1}\n\n[2]\n"three"\n'))
    argv = ["publish", "feed.stdin", "--json", "--idempotency-key", "batch", *api_args(hub.base)]
    assert await run_main(argv) == 0
    rows = json_lines(capsys.readouterr().out)
    assert [row["offset"] for row in rows] == [1, 2, 3]
    history = await hub.api("history", channel="feed.stdin", limit=10)
    assert [pub["data"] for pub in history["publications"]] == [{"n": 1}, [2], "three"]

    # The same stream with the same key again: each line is stored once.
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"n": 1}\n\n[2]\n"three"\n'))
    assert await run_main(argv) == 0
    assert [row["offset"] for row in json_lines(capsys.readouterr().out)] == [1, 2, 3]


async def test_publish_stdin_stops_at_an_invalid_line(
    hub: HubServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n{oops\n3\n"))
    assert await run_main(["publish", "feed.bad", *api_args(hub.base)]) == 2
    line = assert_one_error_line(capsys.readouterr().err)
    assert "stdin line 2" in line
    assert "not valid JSON" in line


async def test_history_since_reverse_and_limit(
    hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    for n in range(1, 5):
        await hub.publish("hist.a", {"n": n})
    epoch = (await hub.api("history", channel="hist.a"))["epoch"]
    base = api_args(hub.base)
    assert await run_main(["history", "hist.a", "--since", f"2:{epoch}", "--json", *base]) == 0
    assert [r["data"]["n"] for r in json_lines(capsys.readouterr().out)] == [3, 4]
    assert await run_main(["history", "hist.a", "--reverse", "-n", "2", "--json", *base]) == 0
    assert [r["offset"] for r in json_lines(capsys.readouterr().out)] == [4, 3]
    assert await run_main(["history", "hist.a", "--since", f"1:{epoch}x", *base]) == 1
    assert "the hub refused history" in assert_one_error_line(capsys.readouterr().err)


async def test_tail_replays_from_earliest_and_from_a_position(
    hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    for n in range(1, 4):
        await hub.publish("tail.a", {"n": n})
    epoch = (await hub.api("history", channel="tail.a"))["epoch"]
    argv = ["tail", "tail.a", "--url", hub.base, "--token", token("alice"), "--json"]
    assert await run_main([*argv, "--since", "earliest", "--count", "3"]) == 0
    out, err = capsys.readouterr()
    assert json_lines(out) == [
        {"topic": "tail.a", "offset": n, "epoch": epoch, "data": {"n": n}} for n in (1, 2, 3)
    ]
    assert "tailing tail.a" in err

    assert await run_main([*argv, "--since", f"1:{epoch}", "--count", "2"]) == 0
    assert [row["offset"] for row in json_lines(capsys.readouterr().out)] == [2, 3]


async def test_tail_pretty_output(hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    await hub.publish("tail.pretty", {"price": 1.5})
    argv = ["tail", "tail.pretty", "--url", hub.base, "--token", token("alice")]
    assert await run_main([*argv, "--since", "earliest", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "tail.pretty #1" in out
    assert '{"price":1.5}' in out


async def test_tail_env_token_and_url(
    hub: HubServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await hub.publish("tail.env", 7)
    monkeypatch.setenv("EVENTCAST_URL", hub.base)
    monkeypatch.setenv("EVENTCAST_TOKEN", token("bob"))
    assert await run_main(["tail", "tail.env", "--since", "earliest", "-n", "1", "--json"]) == 0
    assert json_lines(capsys.readouterr().out)[0]["data"] == 7


async def test_dead_letters_list_and_redrive(
    hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    bus = hub.hub.bus
    sub = bus.subscribe("jobs.x", id="audit", maxsize=1, overflow=Overflow.DROP_NEWEST)
    try:
        for n in range(1, 4):  # the first is buffered, the next two overflow
            await hub.publish("jobs.x", {"job": n})
        base = api_args(hub.base)
        assert await run_main(["dead-letters", "list", "--json", *base]) == 0
        letters = json_lines(capsys.readouterr().out)
        assert [(d["subscriber"], d["reason"], d["data"]) for d in letters] == [
            ("audit", "overflow_drop_newest", {"job": 2}),
            ("audit", "overflow_drop_newest", {"job": 3}),
        ]
        assert all(d["topic"] == "jobs.x" for d in letters)

        assert await run_main(["dead-letters", "list", "--subscriber", "audit", *base]) == 0
        table = capsys.readouterr().out
        assert "2 dead letter(s)" in table
        assert "overflow_drop_newest" in table
        assert await run_main(["dead-letters", "list", "--reason", "handler_error", *base]) == 0
        assert "0 dead letter(s)" in capsys.readouterr().out

        assert (await sub.get()).data == {"job": 1}  # room for one redriven event
        first = letters[0]["id"]
        assert await run_main(["dead-letters", "redrive", "--id", str(first), *base]) == 0
        assert "redriven 1 dead letter(s)" in capsys.readouterr().out
        assert (await sub.get()).data == {"job": 2}

        argv = ["dead-letters", "redrive", "--subscriber", "audit", "--reason"]
        assert await run_main([*argv, "overflow_drop_newest", *base]) == 0
        assert "redriven 1 dead letter(s)" in capsys.readouterr().out
        assert (await sub.get()).data == {"job": 3}
        assert len(bus.dead_letters) == 0
    finally:
        sub.close()


async def test_bench_in_process_json(
    hub: HubServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["bench", hub.base, "--clients", "3", "--rate", "40", "--duration", "0.5", "--json"]
    argv += ["--token", token("bench"), "--api-key", api_args(hub.base)[-1]]
    assert await run_main(argv) == 0
    [summary] = json_lines(capsys.readouterr().out)
    assert summary["clients"] == 3
    assert summary["published"] >= 1
    assert summary["publish_errors"] == 0
    assert summary["deliveries"] == summary["expected_deliveries"] == 3 * summary["published"]
    assert summary["errors"] == 0
    latency = summary["latency_ms"]
    assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


# -- errors: one line, the documented exit code ------------------------------------------------


async def test_bad_input_errors(hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    base = api_args(hub.base)
    refused = ["--url", f"http://127.0.0.1:{free_port()}", "--api-key", "k"]
    cases: list[tuple[list[str], int, str]] = [
        (["publish", "news", "{not json", *base], 2, "DATA is not valid JSON"),
        (["publish", "bad topic!", "1", *base], 2, "invalid topic 'bad topic!'"),
        (["history", "a..b", *base], 2, "invalid topic 'a..b'"),
        (["tail", "a.>.b", "--url", hub.base], 2, "invalid topic pattern"),
        (["publish", "news", "1", *refused], 1, "connection refused"),
        (["history", "news", *refused], 1, "cannot reach the hub at http://127.0.0.1:"),
        (["dead-letters", "list", *refused], 1, "connection refused"),
        (["publish", "news", "1", "--url", hub.base, "--api-key", "wrong"], 1, "401"),
        (["publish", "news", "1", "--url", hub.base], 2, "no API key"),
        (["publish", "nope:x", "1", *base], 1, "the hub refused publish: 102 unknown channel"),
        (["publish", "news", "1", "--url", "ftp://x", "--api-key", "k"], 2, "invalid --url"),
        (["tail", "a.*", "--since", "earliest", "--url", hub.base], 2, "exactly one topic"),
        (["tail", "a", "--since", "x:y", "--url", hub.base], 2, "OFFSET:EPOCH"),
        (["dead-letters", "redrive", *base], 2, "--all"),
        (["bench", "--clients", "1", "--url", hub.base], 2, "no API key"),
    ]
    for argv, code, expected in cases:
        assert await run_main(argv) == code, argv
        out, err = capsys.readouterr()
        assert expected in assert_one_error_line(err), argv
        assert out == "", argv


async def test_tail_token_errors(hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (expired_token(), "the hub closed the connection: token expired"),
        ("not-a-jwt", "the hub closed the connection: invalid token"),
        ("", "the hub closed the connection: invalid token"),
    ]
    for bad, expected in cases:
        assert await run_main(["tail", "news", "--url", hub.base, "--token", bad]) == 1
        out, err = capsys.readouterr()
        assert expected in assert_one_error_line(err)
        assert "--token" in err
        assert out == ""


async def test_tail_refused_subscription_and_unreachable_hub(
    hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # The "priv" namespace needs subscription tokens.
    assert await run_main(["tail", "priv:x", "--url", hub.base, "--token", token()]) == 1
    line = assert_one_error_line(capsys.readouterr().err)
    assert "cannot subscribe to 'priv:x': the hub answered 103 permission denied" in line
    port = free_port()
    assert await run_main(["tail", "x", "--url", f"http://127.0.0.1:{port}"]) == 1
    line = assert_one_error_line(capsys.readouterr().err)
    assert line == f"error: cannot reach the hub at http://127.0.0.1:{port}: connection refused"


async def test_bench_errors(
    hub: HubServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    key = api_args(hub.base)[-1]
    argv = ["bench", hub.base, "--clients", "2", "--duration", "0.2", "--api-key", key]
    assert await run_main([*argv, "--token", expired_token()]) == 1
    assert "token expired" in assert_one_error_line(capsys.readouterr().err)
    assert await run_main([*argv, "--token", token(), "--channel", "priv:x"]) == 1
    assert "subscribe to 'priv:x'" in assert_one_error_line(capsys.readouterr().err)
    port = free_port()
    assert await run_main(["bench", f"http://127.0.0.1:{port}", "--api-key", key]) == 1
    assert "connection refused" in assert_one_error_line(capsys.readouterr().err)
    assert await run_main([*argv, "--token", token(), "--api-key", "wrong"]) == 1
    assert "401" in assert_one_error_line(capsys.readouterr().err)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert await run_main([*argv, "--token", token(), "--plot", str(tmp_path / "p.png")]) == 2
    line = assert_one_error_line(capsys.readouterr().err)
    assert "--plot needs matplotlib: pip install 'eventcast[plot]'" in line
