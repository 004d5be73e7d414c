"""A writer process killed with SIGKILL mid-append, for the logs shared by several processes.

The child opens a log by URL and appends from several tasks at once (so that it
is killed with appends in flight), printing each acknowledged append.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap

from eventcast import Event
from eventcast.log import EventLog, Retention

#: Each writer task appends one event at a time, and prints
#: "offset writer i id epoch" once the append returned (it is acknowledged), forever.
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from eventcast import Event
    from eventcast.log import Retention, open_log

    async def writer(log, tag, w):
        i = 0
        while True:
            [event] = await log.append(
                [Event(topic="crash", data={"p": tag, "w": w, "i": i, "pad": "x" * 200},
                       tags={"i": str(i)})]
            )
            print(event.offset, w, i, event.id, event.epoch, flush=True)
            i += 1

    async def main(url, tag, writers):
        log = open_log(url)
        await log.open()
        log.set_retention(lambda topic: Retention(size=10**9))
        await asyncio.gather(*(writer(log, tag, w) for w in range(writers)))

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)

#: One acknowledged append: (offset, writer, i, event id, epoch).
Ack = tuple[int, int, int, str, str]


class Child:
    """One writer process and the appends it acknowledged."""

    def __init__(self, proc: asyncio.subprocess.Process, tag: str) -> None:
        self.proc = proc
        self.tag = tag
        self.acks: list[Ack] = []

    @classmethod
    async def start(cls, url: str, tag: str, writers: int) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            url,
            tag,
            str(writers),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, tag)

    async def read_acks(self, count: int) -> None:
        """Read acknowledgements until ``count`` more arrived (the child keeps writing)."""
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        goal = len(self.acks) + count
        # A guard against a stuck child, short enough that three reads stay under
        # the test timeout (120 s): pytest-timeout interrupts the event loop mid-turn,
        # losing callbacks, and the teardown then waits forever for a cancelled task.
        async with asyncio.timeout(30):
            while len(self.acks) < goal:
                line = await self.proc.stdout.readline()
                if not line:
                    error = (await self.proc.stderr.read()).decode()
                    raise AssertionError(f"child exited: {error}")
                offset, w, i, event_id, epoch = line.decode().split()
                self.acks.append((int(offset), int(w), int(i), event_id, epoch))

    async def kill(self) -> None:
        """SIGKILL, mid-append."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL


async def check_survivors(log: EventLog, children: list[Child], writers: int) -> None:
    """Every acknowledged append is stored, offsets are exactly 1..top, and the log goes on."""
    log.set_retention(lambda topic: Retention(size=10**9))
    acks = [(child.tag, ack) for child in children for ack in child.acks]
    for child in children:  # concurrent writers: each one's acks in increasing offset order
        for w in range(writers):
            mine = [ack[0] for ack in child.acks if ack[1] == w]
            assert mine == sorted(mine)
    assert len({ack[0] for _, ack in acks}) == len(acks)
    epochs = {ack[4] for _, ack in acks}
    assert len(epochs) == 1
    stored: list[Event] = []
    while page := await log.read("crash", after=stored[-1].offset if stored else 0, limit=250):
        stored += page
    position = await log.position("crash")
    top = position.offset
    # Offsets are exactly 1..top: no gap, no duplicate, nothing half-written.
    assert [e.offset for e in stored] == list(range(1, top + 1))
    assert top >= len(acks)
    assert position.epoch in epochs
    by_offset = {e.offset: e for e in stored}
    for tag, (offset, w, i, event_id, epoch) in acks:
        event = by_offset[offset]
        assert (event.id, event.epoch) == (event_id, epoch)
        assert event.data == {"p": tag, "w": w, "i": i, "pad": "x" * 200}
        assert dict(event.tags) == {"i": str(i)}
    # Each writer's events are stored in the order it appended them, without gaps.
    for child in children:
        for w in range(writers):
            mine = [e.data["i"] for e in stored if e.data["p"] == child.tag and e.data["w"] == w]
            assert mine == list(range(len(mine)))
    [event] = await log.append([Event(topic="crash", data="after")])
    assert event.offset == top + 1
    assert event.epoch == position.epoch
