"""Every decoder that takes bytes from outside: only its documented errors, in linear time.

The targets are the Centrifuge command decoder (and the session that drives it),
the transports' other decoders (a unidirectional connect request, an emulation
request, in JSON and Protobuf), the JSON decoder of request bodies, the HTTP
API's parameter parsing, the SSE cursor parser, topic validation, JWT parsing and
the dashboard's session values.
Under ``make test`` each property runs Hypothesis's default number of examples;
``make fuzz`` runs the same properties with the ``fuzz`` profile (many more
examples, see ``tests/conftest.py``).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from eventcast.exceptions import AuthError, InvalidTopicError
from eventcast.protocol import protobuf
from eventcast.protocol.codec import (
    BOUNDED_DEPTH,
    MAX_JSON_DEPTH,
    ProtocolError,
    decode_commands,
    decode_connect_request,
    decode_emulation_request,
    decode_json,
    too_deep,
)
from eventcast.protocol.frames import MAX_INT, out_of_range
from eventcast.protocol.session import ServerSession
from eventcast.protocol.sse import Cursor, parse_cursor
from eventcast.server._logs import redact
from eventcast.server.api import _BODY_SHAPES, history_params
from eventcast.server.auth import TokenVerifier, mint_token
from eventcast.server.dashboard import Sessions
from eventcast.server.errors import CommandError
from eventcast.topics import validate_pattern, validate_topic

from ..strategies import edge_integers, frames, json_values, topic_names

SECRET = "fuzz-tests-hmac-secret-0123456789abcdef"
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
VERIFIER = TokenVerifier(hmac_secret=SECRET)


# -- the Centrifuge command decoder ------------------------------------------------------------


@FUZZ
@given(frames() | st.binary(max_size=200) | st.text(max_size=200))
@example(b"[" * 5000)
@example(b'{"id":1,"history":{"channel":"a","limit":9223372036854775808}}')
@example(b'{"id":1,"connect":{"name":"\xff\xfe"}}')
def test_the_command_decoder_raises_only_protocol_errors(data: bytes | str) -> None:
    try:
        commands = decode_commands(data)
    except ProtocolError:
        return
    assert commands


@FUZZ
@given(st.lists(frames() | st.binary(max_size=100), min_size=1, max_size=4))
def test_a_session_never_raises_and_numbers_it_admits_are_in_range(frames_: list[bytes]) -> None:
    session = ServerSession(max_bad_commands=3)
    for data in frames_:
        for request in session.receive(data):
            assert out_of_range(request.body) is None
            session.admit(request)
        session.data_to_send()
    assert session.bad_commands <= 3


# -- the other transports' decoders ---------------------------------------------------------------

TRANSPORT_DECODERS: list[Callable[[bytes], object]] = [
    decode_connect_request,
    decode_emulation_request,
    protobuf.decode_emulation_request,
    protobuf.decode_commands,
]


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
@example(b"{" * 3000)
@example(b'{"subs":{"a":{"recover":true,"offset":9223372036854775808}}}')
@example(b'{"session":"s","node":"n","data":"\\ud800"}')
@example(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")
def test_the_transports_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decode in TRANSPORT_DECODERS:
        with contextlib.suppress(ProtocolError):
            decode(data)


# -- JSON bodies ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
@example(b"{" * 3000)
@example(b'"\\' + b"\\" * 100)
@example(b"\xed\xa0\x80")
def test_decode_json_raises_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_json(data)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def nested_list(depth: int) -> Any:
    """A list ``depth`` levels deep."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@st.composite
def nested(draw: st.DrawFn) -> Any:
    """A JSON value nested around the depth limit, with brackets in strings to mislead."""
    value: Any = draw(st.sampled_from(["[[{", "]]}", "", 1, None, '\\"[', "{}"]))
    for _ in range(draw(st.integers(0, MAX_JSON_DEPTH + 3))):
        value = draw(st.sampled_from([[value], {"k[": value}, [value, "]{"], {"a": 1, "b": value}]))
    return value


@FUZZ
@given(nested() | json_values | st.lists(nested() | json_values, min_size=2, max_size=12))
@example([{"publish": {"channel": f"r{i}", "data": {"k": [i, {"v": "x"}]}}} for i in range(50)])
@example([{"s[": "]]" * 40, "t": [[["{"]]]} for _ in range(30)] + [nested_list(70)])
@example(["[" * 600, nested_list(65)])
@example(["\\" * 300, nested_list(65), '\\"]'])
def test_the_depth_check_agrees_with_the_real_depth(value: Any) -> None:
    data = json.dumps(value).encode()
    assert too_deep(data) == (_depth(value) > MAX_JSON_DEPTH)


def _api_body(method: str, data: Any, extra: Any) -> bytes:
    """A body of the HTTP API's ``method`` carrying ``data`` and, unless ``None``, an
    unknown field holding ``extra``."""
    publication: dict[str, Any] = {"channel": "a", "data": data}
    if extra is not None:
        publication["x"] = extra
    if method == "broadcast":
        publication["channels"] = [publication.pop("channel")]
    if method == "batch":
        publication = {
            "commands": [{"publish": {"channel": "b", "data": 1}}, {"publish": publication}]
        }
    return json.dumps(publication).encode()


@FUZZ
@given(
    st.sampled_from(["publish", "broadcast", "batch"]),
    nested() | json_values,
    st.none() | nested() | json_values,
)
@example("batch", nested_list(BOUNDED_DEPTH), None)  # the bounded shape's deepest
@example("batch", nested_list(BOUNDED_DEPTH + 1), None)  # the typed shape's
@example("publish", nested_list(MAX_JSON_DEPTH - 1), None)
@example("publish", nested_list(MAX_JSON_DEPTH), None)
@example("publish", 1, nested_list(MAX_JSON_DEPTH))  # an unknown field, too deep
@example("batch", {"k": [1]}, nested_list(MAX_JSON_DEPTH - 3))
def test_the_api_shapes_decode_what_plain_json_decodes_within_the_limit(
    method: str, data: Any, extra: Any
) -> None:
    """A body of a common form is refused exactly when it nests deeper than the limit
    (whichever of its values does), and otherwise decodes to the same data as plain
    JSON, by whichever of the shape's forms fits it."""
    body = _api_body(method, data, extra)
    if _depth(json.loads(body)) > MAX_JSON_DEPTH:
        with pytest.raises(ProtocolError, match="nested deeper"):
            decode_json(body, _BODY_SHAPES[method])
        return
    decoded = decode_json(body, _BODY_SHAPES[method])
    publication = decoded.commands[1].publish if method == "batch" else decoded
    assert publication.data == json.loads(json.dumps(data))
    bounded = extra is None and _depth(data) <= BOUNDED_DEPTH
    assert type(decoded).__name__.startswith("_Bounded") == bounded


@FUZZ
@given(nested() | json_values, st.integers(0, MAX_JSON_DEPTH + 2))
@example(nested_list(4), 3)  # every layer peeled: the depth is the layers peeled
def test_the_depth_check_agrees_with_the_real_depth_at_any_limit(value: Any, limit: int) -> None:
    assert too_deep(json.dumps(value).encode(), limit) == (_depth(value) > limit)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["limit", "since", "reverse", "x"]), json_values | edge_integers
    )
)
def test_api_history_parameters_raise_only_api_errors(params: dict[str, Any]) -> None:
    try:
        limit, since, _ = history_params(params)
    except CommandError as exc:
        code = exc.code
    else:
        code = 0
        assert 0 <= limit <= MAX_INT
        assert since is None or 0 <= since[0] <= MAX_INT
    assert code in (0, 107)


# -- the SSE cursor ------------------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=300), st.lists(st.text(max_size=5), max_size=3))
@example("1;a!²!abc", [])
@example("1;a!" + "9" * 5000 + "!abc", [])
@example("1;a!9223372036854775808!abc", [])
def test_the_cursor_parser_never_raises(text: str, topics: list[str]) -> None:
    cursor = parse_cursor(text, topics)
    if cursor is not None:
        assert all(0 <= offset <= MAX_INT for _, offset, _ in cursor.positions)


@FUZZ
@given(
    st.dictionaries(
        topic_names(),
        st.tuples(st.integers(0, MAX_INT), st.text("abcdef0123456789", min_size=1, max_size=8)),
        max_size=4,
    )
)
def test_a_cursor_survives_its_text(positions: dict[str, tuple[int, str]]) -> None:
    cursor = Cursor.of(positions)
    assert parse_cursor(cursor.text) == cursor


# -- topics, tokens, sessions, log lines -------------------------------------------------------


@FUZZ
@given(st.text(max_size=300) | topic_names())
def test_topic_validation_raises_only_invalid_topic_errors(name: str) -> None:
    for validate in (validate_topic, validate_pattern):
        with contextlib.suppress(InvalidTopicError):
            assert validate(name) == name


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def tokens(draw: st.DrawFn) -> str:
    """A JWT-shaped string with a hostile header (or a valid token, or noise)."""
    kind = draw(st.sampled_from(["header", "valid", "noise"]))
    if kind == "valid":
        return mint_token(secret=SECRET, user=draw(st.text(max_size=8)), ttl=60)
    if kind == "noise":
        return draw(st.text(max_size=200))
    header: Any = draw(
        json_values
        | st.fixed_dictionaries({"alg": json_values | st.sampled_from(["HS256", "none", "RS256"])})
        | st.integers(0, 3000).map(lambda n: "[" * n + "]" * n)
    )
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    payload = draw(st.binary(max_size=40))
    return f"{_b64(raw)}.{_b64(payload)}.{draw(st.text(max_size=10))}"


@FUZZ
@given(tokens())
@example("\ud800.e30.x")
@example(_b64(b"[" * 3000 + b"]" * 3000) + ".e30.x")
def test_token_parsing_raises_only_auth_errors(token: str) -> None:
    for verify in (
        VERIFIER.verify_connection,
        lambda t: VERIFIER.verify_subscription(t, user="u", channel="c"),
    ):
        with contextlib.suppress(AuthError):
            verify(token)


@FUZZ
@given(st.text(max_size=200))
def test_session_values_from_outside_never_raise(value: str) -> None:
    assert Sessions("admin-token", 60).verify(value) is None


@FUZZ
@given(st.text(max_size=300))
@example("/x?access%255Ftoken=secret-value")
def test_redact_never_raises_and_is_idempotent(text: str) -> None:
    once = redact(text)
    assert redact(once) == once


# -- linear time -------------------------------------------------------------------------------


def _best_of(function: Callable[[Any], object], argument: Any, repeat: int = 5) -> float:
    """The best of a few timings, the collector off (its passes depend on the heap, not
    on the input)."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeat):
            started = time.perf_counter()
            with contextlib.suppress(ProtocolError, AuthError, InvalidTopicError):
                function(argument)
            best = min(best, time.perf_counter() - started)
    finally:
        gc.enable()
    return best


def _adversarial() -> list[tuple[str, Callable[[Any], object], Callable[[int], Any], int]]:
    """``(name, decoder, input of size n, n)``; n times ten is near the most it accepts."""
    frame, body = 6_000, 20_000  # WebSocket frames are at most 64 KiB, bodies 1 MiB
    deep = b"[" * 63 + b"]" * 63 + b","
    return [
        ("commands: brackets", decode_commands, lambda n: b"[" * n, frame),
        ("commands: nested objects", decode_commands, lambda n: b'{"a":' * (n // 5), frame),
        ("commands: escaped quotes", decode_commands, lambda n: b'"' + b'\\"' * (n // 2), frame),
        (
            "commands: arrays of []",
            decode_commands,
            lambda n: b"[" + b"[]," * (n // 3) + b"[]]",
            frame,
        ),
        ("commands: many lines", decode_commands, lambda n: b"{}\n" * (n // 3), frame),
        ("connect request: brackets", decode_connect_request, lambda n: b"[" * n, frame),
        (
            "emulation request: escapes",
            decode_emulation_request,
            lambda n: b'{"data":"' + b'\\"' * (n // 2) + b'"}',
            body,
        ),
        (
            "emulation request: protobuf",
            protobuf.decode_emulation_request,
            lambda n: protobuf.encode_emulation_request("n", "s", b"\n" * n),
            body,
        ),
        ("json: mixed", decode_json, lambda n: b'[{"k":"[",' * (n // 10), body),
        ("json: valid, 64 deep", decode_json, lambda n: b"[" + deep * (n // 128) + b"1]", body),
        (
            # The bounded form decodes all but the last publication (nested one level
            # more than it takes), then the body is checked and decoded again.
            "json: a batch, bounded but for its last data",
            lambda data: decode_json(data, _BODY_SHAPES["batch"]),
            lambda n: (
                b'{"commands":['
                + b'{"publish":{"channel":"a","data":{"k":[1,{"v":"x"}]}}},' * (n // 50)
                + b'{"publish":{"channel":"a","data":%s}}]}' % json.dumps(nested_list(8)).encode()
            ),
            body,
        ),
        ("cursor", parse_cursor, lambda n: "1;" + "abc!1!e;" * (n // 80), body),
        ("topic", validate_topic, lambda n: "a." * (n // 2), body),
        ("token", VERIFIER.verify_connection, lambda n: "e" * n + ".e30.x", body),
        ("redact: query", redact, lambda n: "/?" + "a=b&" * (n // 40), body),
        ("redact: jwt-like", redact, lambda n: "eyJ" * (n // 30), body),
    ]


@pytest.mark.parametrize("target", _adversarial(), ids=[t[0] for t in _adversarial()])
def test_decoders_take_linear_time(
    target: tuple[str, Callable[[Any], object], Callable[[int], Any], int],
) -> None:
    """Ten times the input takes at most 50 times as long: linear, with room for the
    machine's caches and allocator, which make object-heavy work grow up to about 25
    times here. Quadratic work grows 100 times."""
    name, function, build, size = target
    small, large = build(size), build(size * 10)
    ratio = _best_of(function, large) / max(_best_of(function, small), 1e-6)
    assert ratio < 50, f"{name}: 10x the input took {ratio:.0f}x the time"
