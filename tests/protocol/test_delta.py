"""Fossil deltas: round trips, interop with real implementations, hostile deltas.

Three independent implementations check ours:

* ``fossil-delta`` (npm), a port of Fossil's own ``delta.c``: the committed
  vectors in ``fossil_vectors.json`` are its deltas (regenerate them with
  ``python -m tests.protocol.test_delta``), and a live run on node makes and
  applies deltas both ways;
* centrifuge-python's applier (``centrifuge.fossil.apply_delta``), which is
  what a Python SDK does with the deltas we send.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from centrifuge.fossil import apply_delta as sdk_apply
from hypothesis import given, settings, strategies as st

from eventcast.protocol import delta
from eventcast.protocol.codec import ProtocolError
from eventcast.protocol.delta import DeltaError
from tests.conftest import JS_DIR, node_with

VECTORS = Path(__file__).with_name("fossil_vectors.json")


def ticker_document(rng: random.Random, instruments: int = 22) -> dict[str, dict[str, object]]:
    """About 2 KB of JSON: a few fields per instrument."""
    return {
        f"instrument-{i}": {
            "bid": round(rng.random() * 100, 5),
            "ask": round(rng.random() * 100, 5),
            "name": f"Instrument number {i}",
            "volume": rng.randint(0, 10**6),
        }
        for i in range(instruments)
    }


def tick(rng: random.Random, document: dict[str, dict[str, object]], fields: int) -> None:
    for name in rng.sample(sorted(document), fields):
        document[name]["bid"] = round(rng.random() * 100, 5)


def dumps(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def vector_pairs() -> list[tuple[str, bytes, bytes]]:
    """The cases of the committed vectors: (name, source, target)."""
    rng = random.Random(17)
    document = ticker_document(rng)
    source = dumps(document)
    tick(rng, document, 3)
    ticked = dumps(document)
    big = ticker_document(rng, 100)
    big_source = dumps(big)
    tick(rng, big, 5)
    noise = rng.randbytes(1000)
    mutated = bytearray(noise)
    for position in rng.sample(range(1000), 20):
        mutated[position] ^= 0xFF
    text = "Grüße aus Köln — 東京 and Zürich, ".encode() * 20
    return [
        ("empty", b"", b""),
        ("from-empty", b"", b"hello"),
        ("to-empty", b"hello world", b""),
        ("short-source", b"abc", b"abcd"),
        ("identical", source, source),
        ("ticker-3-fields", source, ticked),
        ("insert-start", source, b'{"new":true,' + source[1:]),
        ("insert-middle", source, source[:1000] + b'"inserted":[1,2,3],' + source[1000:]),
        ("truncate-end", source, source[:1500]),
        ("big-5-fields", big_source, dumps(big)),
        ("binary", noise, bytes(mutated)),
        ("utf8", text, text.replace("Köln".encode(), "München".encode())),
        ("repetitive", b"ab" * 500, b"ab" * 400 + b"c" + b"ab" * 100),
        ("unrelated", rng.randbytes(300), rng.randbytes(300)),
    ]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def run_fossil_js(
    create: list[tuple[bytes, bytes]], apply: list[tuple[bytes, bytes]]
) -> tuple[list[bytes], list[bytes | None]]:
    node = node_with("fossil-delta")
    request = {
        "create": [[_b64(s), _b64(t)] for s, t in create],
        "apply": [[_b64(s), _b64(d)] for s, d in apply],
    }
    result = subprocess.run(
        [node, "fossil.mjs"],
        cwd=JS_DIR,
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=60,
        check=True,
    )
    answer = json.loads(result.stdout)
    created = [base64.b64decode(d) for d in answer["created"]]
    applied = [None if t is None else base64.b64decode(t) for t in answer["applied"]]
    return created, applied


# -- round trips ----------------------------------------------------------------------------------


@st.composite
def edited_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A source and a target made from it by a few edits (the case deltas are for)."""
    alphabet = draw(st.sampled_from([b"ab", b'{}":,0123456789abcdef', bytes(range(256))]))
    size = draw(st.integers(0, 3000))
    rng = random.Random(draw(st.integers(0, 2**32)))
    source = bytes(rng.choice(alphabet) for _ in range(size))
    target = bytearray(source)
    for _ in range(draw(st.integers(0, 6))):
        start = draw(st.integers(0, len(target)))
        end = draw(st.integers(start, min(len(target), start + 40)))
        target[start:end] = draw(st.binary(max_size=40))
    return source, bytes(target)


@given(st.one_of(edited_pairs(), st.tuples(st.binary(max_size=300), st.binary(max_size=300))))
@settings(max_examples=300)
def test_apply_create_round_trip(pair: tuple[bytes, bytes]) -> None:
    source, target = pair
    made = delta.create(source, target)
    assert delta.apply(source, made) == target
    assert sdk_apply(source, made) == target  # centrifuge-python applies it too


def test_committed_vectors_from_fossil_delta_apply() -> None:
    vectors = json.loads(VECTORS.read_text())
    assert [v["name"] for v in vectors] == [name for name, _, _ in vector_pairs()]
    for vector, (name, source, target) in zip(vectors, vector_pairs(), strict=True):
        made_by_fossil = base64.b64decode(vector["delta"])
        assert base64.b64decode(vector["source"]) == source, name
        assert base64.b64decode(vector["target"]) == target, name
        assert delta.apply(source, made_by_fossil) == target, name
        ours = delta.create(source, target)
        assert delta.apply(source, ours) == target, name
        # The same header (the target's size); the segments may differ, and
        # the trailer (the checksum) is checked by applying both.
        assert ours.split(b"\n", 1)[0] == made_by_fossil.split(b"\n", 1)[0], name


def test_deltas_are_compact_on_a_ticker_document() -> None:
    vectors = {name: (source, target) for name, source, target in vector_pairs()}
    source, target = vectors["ticker-3-fields"]
    ours = delta.create(source, target)
    fossils = {v["name"]: base64.b64decode(v["delta"]) for v in json.loads(VECTORS.read_text())}
    assert len(ours) < len(target) // 20  # three changed numbers in ~2 KB
    assert len(ours) <= len(fossils["ticker-3-fields"]) + 16
    assert delta.smaller_delta(source, target) == ours
    unrelated = vectors["unrelated"]
    assert delta.smaller_delta(*unrelated) is None


def test_fossil_delta_on_node_applies_ours_and_we_apply_its() -> None:
    rng = random.Random(5)
    pairs = [(source, target) for _, source, target in vector_pairs()]
    for _ in range(40):
        document = ticker_document(rng, rng.randint(1, 40))
        source = dumps(document)
        tick(rng, document, rng.randint(0, min(5, len(document))))
        pairs.append((source, dumps(document)))
    ours = [delta.create(source, target) for source, target in pairs]
    theirs, applied = run_fossil_js(pairs, list(zip((s for s, _ in pairs), ours, strict=True)))
    for (source, target), their_delta, ours_applied in zip(pairs, theirs, applied, strict=True):
        assert ours_applied == target
        assert delta.apply(source, their_delta) == target


# -- hostile deltas -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"", "expected a number"),
        (b"\n", "expected a number"),
        (b"5", "ends in the middle"),
        (b"5;", "not followed by a newline"),
        (b"5\n", "no trailer"),
        (b"5\n5:abc", "past the end of the delta"),
        (b"3\n5:abcde0;", "exceeds the target"),
        (b"9\n6@0,", "past the end of the source"),
        (b"5\n3@0;", "not terminated"),
        (b"5\n3@0", "ends in the middle"),
        (b"2\n3@0,0;", "exceeds the target"),
        (b"5\n2@0,0;", "built 2 bytes"),
        (b"5\n5@0,0;", "checksum"),
        (b"5\n5!", "unknown delta command"),
        (b"~~~~~~~~~~~~\n", "too large"),
        (b"zzzzzz\n", "over the limit"),
    ],
)
def test_malformed_deltas(bad: bytes, message: str) -> None:
    with pytest.raises(DeltaError, match=message):
        delta.apply(b"hello", bad)


def test_a_delta_error_is_a_protocol_error() -> None:
    assert issubclass(DeltaError, ProtocolError)


def test_the_announced_size_is_bounded_before_anything_is_built() -> None:
    made = delta.create(b"", b"x" * 1000)
    assert delta.apply(b"", made, max_size=1000) == b"x" * 1000
    with pytest.raises(DeltaError, match="over the limit of 999"):
        delta.apply(b"", made, max_size=999)


@given(st.binary(max_size=64), st.binary(max_size=200))
@settings(max_examples=500)
def test_random_deltas_raise_only_delta_error(source: bytes, data: bytes) -> None:
    try:
        target = delta.apply(source, data)
    except DeltaError:
        return
    assert isinstance(target, bytes)


@given(edited_pairs(), st.data())
@settings(max_examples=200)
def test_corrupted_deltas_raise_only_delta_error(
    pair: tuple[bytes, bytes], data: st.DataObject
) -> None:
    source, target = pair
    corrupted = bytearray(delta.create(source, target))
    position = data.draw(st.integers(0, len(corrupted) - 1))
    corrupted[position] = data.draw(st.integers(0, 255))
    try:
        result = delta.apply(source, bytes(corrupted))
    except DeltaError:
        return
    assert isinstance(result, bytes)


def _write_vectors() -> None:
    """Regenerate fossil_vectors.json with fossil-delta on node (needs make install)."""
    pairs = vector_pairs()
    created, _ = run_fossil_js([(s, t) for _, s, t in pairs], [])
    vectors = [
        {"name": name, "source": _b64(s), "target": _b64(t), "delta": _b64(d)}
        for (name, s, t), d in zip(pairs, created, strict=True)
    ]
    VECTORS.write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {len(vectors)} vectors to {VECTORS}", file=sys.stderr)


if __name__ == "__main__":
    _write_vectors()
