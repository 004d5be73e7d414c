"""Typed channels: the schema a namespace declares for its publications.

A namespace may declare what its publications look like, in one of three
forms, each compiled once into a :class:`Schema`:

* a ``msgspec.Struct`` class (checked with ``msgspec.convert``, strict);
* a pydantic model class (checked with ``model_validate``; pydantic is
  imported by the application, never by eventcast);
* a JSON Schema, as a dict (the form the hub's TOML and environment
  configuration use), checked with ``jsonschema-rs``: it supports every
  draft up to 2020-12 and validated a small order object in 0.28 µs on the
  project's 2-core machine, against 1.4 µs for fastjsonschema and 37 µs for
  jsonschema (``pip install 'eventcast[schema]'``, part of the server extra).

.. code-block:: python

    class Order(msgspec.Struct):
        id: str
        quantity: int

    bus = Bus(namespaces={"orders": Namespace(schema=Order)})
    await bus.publish("orders:eu", {"id": "o-1", "quantity": "two"})  # InvalidDataError

The bus checks the data of every publish into a typed namespace before the
event is built (``publish``, ``publish_nowait``, ``publish_many``), so the
hub's client publishes and HTTP API, which publish through the bus, are
checked by the same code. Valid data is not converted nor encoded: the event
keeps the object published and is encoded once, as any other. Refusals raise
:class:`~eventcast.exceptions.InvalidDataError` and are counted in
:attr:`Schema.refused`. Error messages name where the data broke the schema
and which rule, never the offending value (event bodies stay out of logs).

:func:`decoder_for` is the reading side: the client's ``subscribe(channel,
type=Order)`` decodes each publication's JSON into the declared type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias

import msgspec

from .exceptions import ConfigurationError, InvalidDataError

__all__ = ["Decoder", "Schema", "SchemaSpec", "compile_schema", "decoder_for"]

#: What a namespace's ``schema`` option accepts.
SchemaSpec: TypeAlias = "Schema | type | Mapping[str, Any]"
#: Decodes a publication's JSON (and its topic, for messages) into a declared type.
Decoder: TypeAlias = Callable[[bytes, str], Any]

_json_decode: Final = msgspec.json.Decoder().decode


class Schema:
    """A compiled publication schema: :meth:`validate`, :attr:`json_schema`, :attr:`refused`.

    Build one with :func:`compile_schema` (a namespace does it for you).

    Attributes:
        name: a short name for documents and messages (the class name, or
            the JSON Schema's ``title``).
        json_schema: the schema as JSON Schema (for AsyncAPI documents).
        refused: how many publications this schema refused so far.
    """

    __slots__ = ("_check", "json_schema", "name", "refused")

    def __init__(
        self,
        name: str,
        json_schema: dict[str, Any],
        check: Callable[[object], str | None],
    ) -> None:
        self.name = name
        self.json_schema = json_schema
        self.refused = 0
        self._check = check

    def __repr__(self) -> str:
        return f"<Schema {self.name!r}>"

    def validate(self, data: object, topic: str) -> None:
        """Check that ``data`` (an object, or JSON ``bytes``) matches the schema.

        Raises:
            InvalidDataError: it does not; the message says where and which rule.
        """
        if isinstance(data, bytes | bytearray | memoryview):
            try:
                data = _json_decode(data)
            except msgspec.DecodeError:
                problem: str | None = "the data is not JSON"
            else:
                problem = self._check(data)
        else:
            problem = self._check(data)
        if problem is not None:
            self.refused += 1
            raise InvalidDataError(
                f"data published to {topic!r} does not match the schema {self.name!r}: {problem}",
                topic,
            )


def compile_schema(spec: Schema | type | Mapping[str, Any]) -> Schema:
    """Compile a msgspec ``Struct`` class, a pydantic model class or a JSON Schema dict.

    Raises:
        ConfigurationError: the spec is none of these, or the JSON Schema is invalid
            (or ``jsonschema-rs`` is not installed).
    """
    if isinstance(spec, Schema):
        return spec
    if isinstance(spec, type) and issubclass(spec, msgspec.Struct):
        return _struct_schema(spec)
    if isinstance(spec, type) and _is_pydantic_model(spec):
        return _pydantic_schema(spec)
    if isinstance(spec, Mapping):
        return _json_schema(dict(spec))
    raise ConfigurationError(
        "a schema is a msgspec Struct class, a pydantic model class or a JSON Schema dict, "
        f"not {spec!r}"
    )


def _is_pydantic_model(cls: type) -> bool:
    # Duck-typed: eventcast never imports pydantic for the application's models.
    return callable(getattr(cls, "model_validate", None)) and callable(
        getattr(cls, "model_json_schema", None)
    )


def _struct_schema(cls: type[msgspec.Struct]) -> Schema:
    def check(data: object) -> str | None:
        if isinstance(data, cls):
            return None
        try:
            msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            return str(exc)
        return None

    return Schema(cls.__name__, msgspec.json.schema(cls), check)


def _pydantic_schema(cls: type) -> Schema:
    validate = cls.model_validate  # type: ignore[attr-defined]

    def check(data: object) -> str | None:
        if isinstance(data, cls):
            return None
        try:
            validate(data, strict=True)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            return _pydantic_problems(exc)
        return None

    json_schema: dict[str, Any] = cls.model_json_schema()  # type: ignore[attr-defined]
    return Schema(cls.__name__, json_schema, check)


def _pydantic_problems(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return type(exc).__name__
    problems = []
    for error in errors(include_url=False, include_input=False, include_context=False):
        where = "$" + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]
        )
        problems.append(f"{error['msg']} - at `{where}`")
    return "; ".join(problems)


def _json_schema(schema: dict[str, Any]) -> Schema:
    try:
        import jsonschema_rs
    except ImportError as exc:
        raise ConfigurationError(
            "a JSON Schema needs jsonschema-rs: pip install 'eventcast[schema]'"
        ) from exc
    try:
        validator = jsonschema_rs.validator_for(schema)
    except (jsonschema_rs.ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigurationError(f"invalid JSON Schema: {first}") from None

    def check(data: object) -> str | None:
        if validator.is_valid(data):
            return None
        for error in validator.iter_errors(data):
            return _json_schema_problem(schema, error.instance_path, error.schema_path)
        return "invalid"  # pragma: no cover - is_valid and iter_errors agree

    name = schema.get("title")
    return Schema(name if isinstance(name, str) and name else "schema", schema, check)


def _json_schema_problem(schema: Mapping[str, Any], instance_path: Any, schema_path: Any) -> str:
    """Where the data broke which rule, from the paths (never quoting the data)."""
    where = "$" + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in instance_path
    )
    rule: Any = schema
    for part in schema_path:
        try:
            rule = rule[part]
        except (KeyError, IndexError, TypeError):
            rule = None
            break
    keyword = schema_path[-1] if schema_path else "schema"
    if rule is None or (isinstance(rule, dict | list) and len(str(rule)) > 120):
        return f"breaks {keyword!r} - at `{where}`"
    return f"breaks {keyword!r}: {msgspec.json.encode(rule).decode()} - at `{where}`"


def decoder_for(tp: Any) -> Decoder:
    """Return a function decoding publication JSON into ``tp``.

    ``tp`` is a pydantic model class, or any type msgspec decodes (a
    ``Struct``, a dataclass, ``dict[str, int]``, ...).

    Raises:
        ConfigurationError: msgspec cannot decode into ``tp``.
    """
    if isinstance(tp, type) and _is_pydantic_model(tp):
        validate_json = tp.model_validate_json  # type: ignore[attr-defined]

        def decode_model(data: bytes, topic: str) -> Any:
            try:
                return validate_json(data)
            except ValueError as exc:
                raise InvalidDataError(
                    f"an event of {topic!r} does not fit {tp.__name__}: {_pydantic_problems(exc)}",
                    topic,
                ) from None

        return decode_model
    try:
        decoder = msgspec.json.Decoder(tp)
    except TypeError as exc:
        raise ConfigurationError(f"cannot decode events into {tp!r}: {exc}") from exc
    name = getattr(tp, "__name__", repr(tp))

    def decode(data: bytes, topic: str) -> Any:
        try:
            return decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidDataError(
                f"an event of {topic!r} does not fit {name}: {exc}", topic
            ) from None

    return decode
