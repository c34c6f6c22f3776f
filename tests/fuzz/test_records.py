"""Fuzz target: the engine's input decoder takes any bytes to a dict or a RecordError, nothing else."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from joey_core import records
from joey_core.records import RecordError, bounded_text, decode_input

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)
# Spellings JSON lacks but Python's parser knows or might be expected to: they must decode or be refused.
_SPELLINGS = ["NaN", "-NaN", "Infinity", "-Infinity", "inf", "nan", "1e999", "-1e999", "9" * 4300]


def assert_contract(value: bytes) -> None:
    try:
        row = decode_input(value)
    except RecordError as exc:
        assert str(exc)
    else:
        assert isinstance(row, dict)


@given(st.binary(max_size=200))
@example(b"\xff\xfe{}")
@example(b'{"a": 1}\x80')
def test_any_bytes_decode_or_are_refused(value: bytes) -> None:
    assert_contract(value)


@given(_JSON, st.sampled_from(["utf-8", "utf-16", "utf-32", "latin-1"]))
def test_json_documents_in_any_encoding(document: object, encoding: str) -> None:
    assert_contract(json.dumps(document, ensure_ascii=False).encode(encoding, errors="replace"))


@given(
    st.sampled_from(_SPELLINGS), st.text(st.characters(codec="ascii", exclude_categories=["Nd"]), max_size=3)
)
def test_number_spellings(spelling: str, noise: str) -> None:
    assert_contract(f'{{"x": {spelling}{noise}}}'.encode())
    assert_contract(f'{{"x": [{spelling}, "{noise}"]}}'.encode())


@given(st.lists(st.tuples(st.sampled_from("abc"), _SCALARS), min_size=2, max_size=6))
def test_duplicate_keys(pairs: list[tuple[str, object]]) -> None:
    body = ",".join(f"{json.dumps(key)}:{json.dumps(value)}" for key, value in pairs)
    assert_contract(f"{{{body}}}".encode())


@given(st.integers(min_value=1, max_value=500), st.sampled_from(["[", '{"a":']))
def test_moderate_nesting(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    assert_contract(('{"x":' + opener * depth + "1" + closer * depth + "}").encode())


# Deep nesting made json.loads raise RecursionError, which decode_input let escape (issue 13).
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deep_nesting_is_refused(opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    assert_contract(('{"x":' + opener * 100_000 + "1" + closer * 100_000 + "}").encode())


# Found by test_number_spellings: an integer of more than 4300 digits made json.loads raise a plain
# ValueError (Python's int-conversion limit), which decode_input let escape.
def test_an_integer_too_long_to_convert_is_refused() -> None:
    assert_contract(b'{"x": ' + b"9" * 4301 + b"}")


def json_decision(value: bytes) -> tuple[str, str]:
    """What decode_input decided when it parsed with json alone (before orjson): the row, or the reason."""
    try:
        # The hook decode_input ran json with.
        row = json.loads(value, object_pairs_hook=records._unique_keys)  # noqa: SLF001
    except RecordError as exc:
        return "refused", str(exc)
    except RecursionError:
        return "refused", "record is not valid JSON: nested too deeply"
    except ValueError as exc:
        return "refused", f"record is not valid JSON: {bounded_text(str(exc), 200)}"
    if not isinstance(row, dict):
        return (
            "refused",
            f"record must be a JSON object mapping input names to values, got {type(row).__name__}",
        )
    return "row", repr(row)


def decision(value: bytes) -> tuple[str, str]:
    try:
        return "row", repr(decode_input(value))
    except RecordError as exc:
        return "refused", str(exc)


_WIDE_INTEGERS = st.integers(min_value=-(2**70), max_value=2**70) | st.integers()


# orjson decides for json where they agree (issue 14): every decision and reason must stay json's.
@given(
    st.recursive(
        _SCALARS | _WIDE_INTEGERS,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from("abc"), inner, max_size=4)
        ),
        max_leaves=20,
    ),
    st.sampled_from(["utf-8", "utf-16", "utf-8-sig"]),
)
@example({"a": -(2**63) - 1}, "utf-8")
@example({"a": 2**64}, "utf-8")
@example({"a": float("nan"), "b": float("inf")}, "utf-8")
@example({"a": "\ud800"}, "utf-8")
def test_decisions_are_those_of_json(document: object, encoding: str) -> None:
    value = json.dumps(document).encode(encoding)
    assert decision(value) == json_decision(value)


@given(st.binary(max_size=200))
@example(b'{"a":1,"a":2}')
@example(b'{"x":' + b"[" * 2000 + b"]" * 2000 + b"}")
@example(b'{"a":1e400}')
@example(b'{"a":"\xff"}')
def test_decisions_on_any_bytes_are_those_of_json(value: bytes) -> None:
    assert decision(value) == json_decision(value)
