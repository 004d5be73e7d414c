"""The ``eventcast`` script as a real subprocess against a real ``eventcast serve`` process."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.server.hubtools import API_KEY, HubServer, free_port, token

from .clitools import EVENTCAST, LineReader, assert_one_error_line, cli_env, run_cli
from .test_commands import expired_token


def hub_env(hub: HubServer, **extra: str) -> dict[str, str]:
    return cli_env(EVENTCAST_URL=hub.base, EVENTCAST_API_KEY=API_KEY, **extra)


def interruptible() -> None:
    """Give the child Ctrl-C's default disposition (Python then raises KeyboardInterrupt).

    A suite started as a background job of a non-interactive shell runs with SIGINT
    ignored, and a child inherits an ignored signal: it would never see the test's
    Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_publish_then_history(hub_process: HubServer) -> None:
    env = hub_env(hub_process)
    done = run_cli(["publish", "proc.news", '{"title": "from a process"}'], env=env)
    assert done.returncode == 0, done.stderr
    assert "published to proc.news at offset 1" in done.stdout
    shown = run_cli(["history", "proc.news"], env=env)
    assert shown.returncode == 0, shown.stderr
    assert '{"title":"from a process"}' in shown.stdout
    rows = run_cli(["history", "proc.news", "--json"], env=env)
    assert [json.loads(line)["data"] for line in rows.stdout.splitlines()] == [
        {"title": "from a process"}
    ]


def test_publish_from_stdin_lines(hub_process: HubServer) -> None:
    env = hub_env(hub_process)
    lines = "".join(f'{{"n": {n}}}\n' for n in range(1, 6))
    done = run_cli(["publish", "proc.stdin", "--json"], stdin=lines, env=env)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["offset"] for line in done.stdout.splitlines()] == [1, 2, 3, 4, 5]
    rows = run_cli(["history", "proc.stdin", "--json", "--limit", "10"], env=env)
    assert [json.loads(line)["data"]["n"] for line in rows.stdout.splitlines()] == [1, 2, 3, 4, 5]


def test_tail_json_receives_live_publications_and_exits_0_on_sigint(
    hub_process: HubServer,
) -> None:
    env = hub_env(hub_process, EVENTCAST_TOKEN=token("alice"))
    process = subprocess.Popen(
        [str(EVENTCAST), "tail", "proc.live", "live:ticks.*", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=interruptible,
    )
    reader = LineReader(process)
    try:
        assert "tailing proc.live, live:ticks.*" in reader.err_line()
        for topic, data in (("proc.live", '{"n": 1}'), ("live:ticks.a", '"tick"')):
            assert run_cli(["publish", topic, data], env=env).returncode == 0
        first, second = json.loads(reader.out_line()), json.loads(reader.out_line())
        assert first["topic"] == "proc.live"
        assert first["data"] == {"n": 1}
        assert first["offset"] == 1
        assert isinstance(first["epoch"], str)
        assert first["epoch"]
        assert second == {"topic": "live:ticks.a", "offset": None, "epoch": None, "data": "tick"}
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        rest = "".join(reader.rest(reader.stderr))
        assert "Traceback" not in rest
    finally:
        reader.stop()


def test_publish_stdin_interrupted_exits_130(hub_process: HubServer) -> None:
    process = subprocess.Popen(
        [str(EVENTCAST), "publish", "proc.interrupted", "--json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=hub_env(hub_process),
        preexec_fn=interruptible,
    )
    reader = LineReader(process)
    try:
        assert process.stdin is not None
        process.stdin.write("1\n")
        process.stdin.flush()
        assert json.loads(reader.out_line())["offset"] == 1  # published; now waiting on stdin
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
        err = "".join(reader.rest(reader.stderr))
        assert "Traceback" not in err
        assert "interrupted" in err
    finally:
        reader.stop()


def test_bench_with_plot(hub_process: HubServer, tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    argv = ["bench", hub_process.base, "--clients", "4", "--rate", "50", "--duration", "1"]
    done = run_cli(
        [*argv, "--plot", str(png)], env=hub_env(hub_process, EVENTCAST_TOKEN=token("bench"))
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    out = done.stdout
    assert "deliveries/s" in out
    assert "latency p99" in out
    rows = {
        cells[0]: cells[1]
        for line in out.splitlines()
        if (cells := [c.strip() for c in line.strip("│ ").split("│")]) and len(cells) == 2
    }
    assert float(rows["deliveries/s"]) > 0
    assert rows["latency p50"].endswith(" ms")
    assert float(rows["latency p50"].removesuffix(" ms")) >= 0
    assert rows["errors"] == "0"
    assert f"plot written to {png}" in out


def test_errors_are_one_line_with_the_documented_exit_code(hub_process: HubServer) -> None:
    env = hub_env(hub_process)
    port = free_port()
    cases: list[tuple[list[str], dict[str, str], int, str]] = [
        (["publish", "proc.x", "{bad"], env, 2, "DATA is not valid JSON"),
        (["publish", "bad topic", "1"], env, 2, "invalid topic 'bad topic'"),
        (
            ["history", "proc.x", "--url", f"http://127.0.0.1:{port}"],
            env,
            1,
            f"cannot reach the hub at http://127.0.0.1:{port}: connection refused",
        ),
        (["publish", "proc.x", "1", "--api-key", "wrong"], env, 1, "rejected the API key"),
        (
            ["tail", "proc.x", "--token", expired_token()],
            env,
            1,
            "the hub closed the connection: token expired",
        ),
    ]
    for argv, case_env, code, expected in cases:
        done = run_cli(argv, env=case_env)
        assert done.returncode == code, (argv, done.stderr)
        assert expected in assert_one_error_line(done.stderr), argv
        assert done.stdout == ""
