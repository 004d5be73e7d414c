"""The chaos harness's history checker, on hand-made histories: each violation kind is found."""

from __future__ import annotations

import math

import pytest

from _history import (
    SAMPLES_PER_KIND,
    ClientHistory,
    Kind,
    Publish,
    Received,
    Retention,
    Subscribed,
    Verdict,
    check,
    summary,
)

EPOCH = "e1"
RETENTION = Retention(history_size=100, replay_cap=50)


def acks(first: int, last: int, *, sent_at: float = 0.0) -> list[Publish]:
    """Acknowledged publications ``first..last``; the data at offset n is ``{"n": n}``."""
    return [
        Publish({"n": n}, sent_at=sent_at + n, offset=n, epoch=EPOCH, acked_at=sent_at + n + 0.5)
        for n in range(first, last + 1)
    ]


def live(n: int, at: float | None = None) -> Received:
    return Received(at=n + 1.0 if at is None else at, offset=n, data={"n": n})


def replayed(n: int) -> Received:
    return Received(at=1000.0 + n, offset=n, data={"n": n}, replayed=True)


def first(offset: int = 0, at: float = 0.0) -> Subscribed:
    return Subscribed(at=at, epoch=EPOCH, offset=offset)


def resume(since: int, head: int, *, recovered: bool = True, at: float = 0.0) -> Subscribed:
    return Subscribed(
        at=at, epoch=EPOCH, offset=head, since=since, since_epoch=EPOCH, recovered=recovered
    )


def run(
    records: list[Subscribed | Received],
    publishes: list[Publish] | None = None,
    retention: Retention = RETENTION,
    end: int | None = None,
) -> Verdict:
    history = ClientHistory.of("c1", records)
    return check(acks(1, 10) if publishes is None else publishes, [history], retention, end=end)


def kinds(verdict: Verdict) -> dict[Kind, int]:
    return dict(verdict.counts)


def test_a_clean_history_with_a_recovery_passes() -> None:
    verdict = run(
        [
            first(0),
            *(live(n) for n in range(1, 5)),
            resume(4, 7),
            *(replayed(n) for n in range(5, 8)),
            *(live(n) for n in range(8, 11)),
        ]
    )
    assert verdict.ok, list(verdict.violations())
    assert (verdict.delivered, verdict.replayed) == (10, 3)
    assert (verdict.resumes, verdict.recovered, verdict.unrecovered_legal) == (1, 1, 0)
    assert (verdict.published, verdict.acknowledged, verdict.clients) == (10, 10, 1)
    # Live latency only: publish call at n, arrival at n + 1.
    assert len(verdict.latencies) == 7
    assert verdict.percentile_ms(50) == pytest.approx(1000.0)


def test_a_missing_publication_is_lost() -> None:
    verdict = run([first(0), *(live(n) for n in range(1, 11) if n != 6)])
    assert kinds(verdict) == {Kind.LOST: 1}
    assert verdict.lost == 1
    (violation,) = verdict.violations()
    assert violation.offset == 6
    assert "lost at offset 6 (c1)" in str(violation)


def test_loss_counts_only_after_the_first_subscribe_and_up_to_end() -> None:
    assert run([first(3), *(live(n) for n in range(4, 8))], end=7).ok
    verdict = run([first(3), *(live(n) for n in range(4, 8))])
    assert [v.offset for v in verdict.violations()] == [8, 9, 10]


def test_the_handoff_duplicate_is_found() -> None:
    # The shape of issue 12: resume from N-1, the reply replays N, then N arrives live.
    verdict = run(
        [first(0), *(live(n) for n in range(1, 5)), resume(4, 5), replayed(5), live(5)]
        + [live(n) for n in range(6, 11)]
    )
    assert kinds(verdict) == {Kind.DUPLICATE: 1}
    assert verdict.duplicated == 1
    (violation,) = verdict.violations()
    assert (violation.offset, violation.detail) == (5, "live, position 5")
    assert verdict.delivered == 10


def test_a_replayed_duplicate_is_found() -> None:
    verdict = run(
        [first(0), *(live(n) for n in range(1, 5)), resume(3, 5), replayed(4), replayed(5)]
        + [live(n) for n in range(6, 11)]
    )
    assert kinds(verdict) == {Kind.DUPLICATE: 1}
    assert next(verdict.violations()).detail.startswith("replayed")


def test_an_offset_below_the_highest_is_out_of_order() -> None:
    verdict = run([first(0), live(1), live(3), live(2), *(live(n) for n in range(4, 11))])
    assert kinds(verdict) == {Kind.OUT_OF_ORDER: 1}
    assert verdict.out_of_order == 1


def test_a_live_publication_at_or_below_the_subscribe_position_is_stale() -> None:
    # A first subscribe answered at position 5, then offset 5 pushed live.
    verdict = run([first(5), live(5), *(live(n) for n in range(6, 11))])
    assert kinds(verdict) == {Kind.STALE: 1}
    assert verdict.out_of_order == 1


def test_data_that_differs_from_the_acknowledged_is_wrong() -> None:
    bad = Received(at=3.0, offset=2, data={"n": "corrupt"})
    verdict = run([first(0), live(1), bad, *(live(n) for n in range(3, 11))])
    assert kinds(verdict) == {Kind.WRONG_DATA: 1}


def test_an_offset_nobody_published_is_unknown() -> None:
    verdict = run([first(0), *(live(n) for n in range(1, 11)), Received(20.0, 11, {"n": "ghost"})])
    assert kinds(verdict) == {Kind.UNKNOWN: 1}


def test_an_indeterminate_publication_may_be_delivered_but_the_same_everywhere() -> None:
    publishes = [*acks(1, 3), Publish({"n": "maybe"}, sent_at=4.0), *acks(5, 6)]
    records: list[Subscribed | Received] = [
        first(0),
        *(live(n) for n in range(1, 4)),
        Received(5.0, 4, {"n": "maybe"}),
        live(5),
        live(6),
    ]
    assert check(publishes, [ClientHistory.of("a", records)], RETENTION).ok
    # Another client sees other data at offset 4: one of the two is wrong.
    other = [first(0), *(live(n) for n in range(1, 4)), Received(5.0, 4, {"n": 4}), live(5)]
    other.append(live(6))
    verdict = check(
        publishes,
        [ClientHistory.of("a", records), ClientHistory.of("b", other)],
        RETENTION,
    )
    assert kinds(verdict) == {Kind.UNKNOWN: 1}  # {"n": 4} was never sent at all
    sent_twice = [*publishes, Publish({"n": 4}, sent_at=4.5)]
    verdict = check(
        sent_twice, [ClientHistory.of("a", records), ClientHistory.of("b", other)], RETENTION
    )
    assert kinds(verdict) == {Kind.WRONG_DATA: 1}


@pytest.mark.parametrize(
    ("retention", "since", "head", "at", "why"),
    [
        (Retention(history_size=100, replay_cap=5), 2, 9, 0.0, "replay cap 5"),
        (Retention(history_size=5, replay_cap=50), 2, 9, 0.0, "history_size 5"),
        (Retention(history_size=100, replay_cap=50, history_ttl=10.0), 2, 9, 14.0, "history_ttl"),
    ],
    ids=["replay-cap", "history-size", "history-ttl"],
)
def test_recovered_false_beyond_retention_is_legal_and_excuses_the_gap(
    retention: Retention, since: int, head: int, at: float, why: str
) -> None:
    records: list[Subscribed | Received] = [
        first(0),
        live(1),
        live(2),
        resume(since, head, recovered=False, at=at),
        live(10),
    ]
    verdict = run(records, retention=retention)
    assert verdict.ok, list(verdict.violations())
    assert (verdict.resumes, verdict.recovered, verdict.unrecovered_legal) == (1, 0, 1)
    (note,) = verdict.notes
    assert note.startswith("c1: resume from 2: ")
    assert why in note


@pytest.mark.parametrize(
    ("since", "head", "at"),
    [(2, 9, 0.0), (2, 9, 11.0), (12, 9, 0.0)],
    ids=["within-every-limit", "younger-than-ttl", "beyond-head"],
)
def test_recovered_false_within_retention_is_a_violation_and_the_gap_is_lost(
    since: int, head: int, at: float
) -> None:
    retention = Retention(history_size=100, replay_cap=50, history_ttl=10.0)
    verdict = run(
        [first(0), live(1), live(2), resume(since, head, recovered=False, at=at), live(10)],
        retention=retention,
    )
    assert verdict.count(Kind.UNRECOVERED) == 1
    assert verdict.lost == 7  # offsets 3..9
    assert verdict.unrecovered_legal == 0


def test_a_changed_epoch_is_a_violation() -> None:
    moved = Subscribed(at=0.0, epoch="e2", offset=0, since=4, since_epoch=EPOCH)
    verdict = run([first(0), *(live(n) for n in range(1, 5)), moved], end=4)
    assert verdict.count(Kind.EPOCH_CHANGED) == 1
    # ... and so is a publisher acknowledged in two epochs.
    publishes = [*acks(1, 2), Publish({"n": 3}, 3.0, offset=1, epoch="e2", acked_at=3.5)]
    assert check(publishes, [], RETENTION).counts == {Kind.EPOCH_CHANGED: 1}


def test_a_client_that_never_subscribed_is_a_violation() -> None:
    verdict = check(acks(1, 3), [ClientHistory("silent")], RETENTION)
    assert kinds(verdict) == {Kind.NEVER_SUBSCRIBED: 1}


def test_violations_are_counted_all_but_sampled() -> None:
    records = [first(0), *(live(1) for _ in range(SAMPLES_PER_KIND + 5))]
    verdict = run(records, end=1)
    assert verdict.duplicated == SAMPLES_PER_KIND + 4
    assert len(list(verdict.violations())) == SAMPLES_PER_KIND
    assert not verdict.ok


def test_records_come_back_in_arrival_order() -> None:
    records: list[Subscribed | Received] = [
        first(0),
        first(0),
        live(1),
        resume(1, 3),
        replayed(2),
        replayed(3),
        resume(3, 3),
    ]
    history = ClientHistory.of("c", records)
    assert list(history.records()) == records
    assert history.receptions == 3
    assert history.subscribes == [records[0], records[1], records[3], records[6]]


def test_the_summary_is_json_ready() -> None:
    verdict = run([first(0), *(live(n) for n in range(1, 11) if n != 3)])
    figures = summary(verdict)
    assert figures["lost"] == 1
    assert figures["violations"] == {"lost": 1}
    assert figures["examples"] == ["lost at offset 3 (c1): expected after 0"]
    assert figures["latency_ms"]["samples"] == 9
    empty = summary(check([], [], RETENTION))
    assert math.isnan(empty["latency_ms"]["p50"])
