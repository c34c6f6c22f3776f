"""Fuzz target: registry page tokens. A token round-trips; a damaged or random one is refused with
InvalidArgument, or (tokens are unsigned by design) names a position in range of the same query."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from hypothesis import example, given
from hypothesis import strategies as st

from joey_registry import page_tokens
from joey_registry.domain import LogCursor, LogQuery
from joey_registry.errors import InvalidArgument

_QUERY = LogQuery("default", "p")
_OTHER = LogQuery("default", "q")
_TIME = st.datetimes(timezones=st.just(UTC))
_CURSORS = st.builds(LogCursor, _TIME, st.integers(min_value=1, max_value=2**63 - 1))
_TOTALS = st.integers(min_value=0, max_value=2**63 - 1)


def decoded_or_refused(token: str) -> None:
    try:
        cursor, total = page_tokens.decode(_QUERY, token)
    except InvalidArgument as exc:
        assert str(exc).startswith("invalid page token") or "does not belong" in str(exc)
        return
    assert cursor.time.tzinfo is UTC and 1 <= cursor.id <= 2**63 - 1 and 0 <= total <= 2**63 - 1
    # Whatever was accepted is the position a fresh token for it names: nothing outside the fields leaks in.
    assert page_tokens.decode(_QUERY, page_tokens.encode(_QUERY, cursor, total)) == (cursor, total)


@given(_CURSORS, _TOTALS)
@example(LogCursor(datetime.max.replace(tzinfo=UTC), 2**63 - 1), 2**63 - 1)
@example(LogCursor(datetime.min.replace(tzinfo=UTC), 1), 0)
def test_round_trip(cursor: LogCursor, total: int) -> None:
    token = page_tokens.encode(_QUERY, cursor, total)
    assert page_tokens.decode(_QUERY, token) == (cursor, total)


@given(_CURSORS, _TOTALS)
def test_a_token_of_another_query_is_refused(cursor: LogCursor, total: int) -> None:
    token = page_tokens.encode(_OTHER, cursor, total)
    try:
        page_tokens.decode(_QUERY, token)
    except InvalidArgument as exc:
        assert "does not belong to this query" in str(exc)
    else:
        raise AssertionError("a token of another query was accepted")


@given(
    _CURSORS, _TOTALS, st.lists(st.tuples(st.integers(min_value=0), st.characters()), min_size=1, max_size=3)
)
def test_mutated_tokens(cursor: LogCursor, total: int, edits: list[tuple[int, str]]) -> None:
    token = list(page_tokens.encode(_QUERY, cursor, total))
    for at, char in edits:
        token[at % len(token)] = char
    decoded_or_refused("".join(token))


@given(st.binary(max_size=300))
@example(b'{"v":1,"f":"x","t":1e999,"i":1,"n":0}')  # a float where an int belongs
@example(b'{"v":true,"f":"x","t":0,"i":1,"n":0}')  # bool is an int subclass in Python
def test_random_bodies(body: bytes) -> None:
    decoded_or_refused(base64.urlsafe_b64encode(body).decode().rstrip("="))


@given(st.text(max_size=600))
def test_random_text(token: str) -> None:
    decoded_or_refused(token)
