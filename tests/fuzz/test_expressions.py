"""Fuzz target: the check language. Any text compiles or raises ExpressionError; a compiled check evaluated
over small frames gives one bool per row or raises ExpressionError, nothing else."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import event, example, given
from hypothesis import strategies as st

from joey_core.expressions import MAX_DEPTH, ExpressionError, compile_expression

_NUMBERS = st.sampled_from(
    ["in.x", "out.p", "out.v", "in.s", "in.missing", "out.p[0]", "out.v[-1]", "out.v[9]", "in.x[0]"]
    + ["0", "1", "-1", ".5", "1e308", "9223372036854775807", "(1)"]
)
_NUMERIC_CALLS = st.sampled_from(["", "-", "abs(", "len(", "sum(", "mean(", "min(", "max(", "("])
_ARITHMETIC = st.sampled_from([" + ", " - ", " * ", " / ", " % "])
_COMPARISONS = st.sampled_from([" < ", " <= ", " > ", " >= ", " == ", " != ", ' != "a" or in.s == '])
_BOOLS = st.sampled_from(["", "not ", "any(", "all(", "("])


@st.composite
def _term(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        call = draw(_NUMERIC_CALLS)
        parts.append(call + draw(_NUMBERS) + ")" * call.count("("))
    return draw(_ARITHMETIC).join(parts)


@st.composite
def near_valid(draw: st.DrawFn) -> str:
    """Checks built from the grammar's pieces, so most parse and many type-check and evaluate."""
    clauses = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        wrap = draw(_BOOLS)
        clause = draw(_term()) + draw(_COMPARISONS) + draw(_term())
        clauses.append(wrap + clause + ")" * wrap.count("("))
    text = draw(st.sampled_from([" and ", " or "])).join(clauses)
    # Now and then damage one character, which is where hand-written parsers crash.
    if draw(st.integers(min_value=0, max_value=5)) == 0:
        at = draw(st.integers(min_value=0, max_value=len(text) - 1))
        text = text[:at] + draw(st.characters()) + text[at + 1 :]
    return text


_ROWS = st.integers(min_value=0, max_value=3)


@st.composite
def frames(draw: st.DrawFn) -> tuple[dict[tuple[str, str], Any], int]:
    rows = draw(_ROWS)
    floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
    width = draw(st.integers(min_value=0, max_value=3))
    columns: dict[tuple[str, str], Any] = {
        ("in", "x"): np.array(draw(st.lists(floats, min_size=rows, max_size=rows)), dtype=np.float64),
        ("out", "p"): np.array(draw(st.lists(st.integers(-5, 5), min_size=rows, max_size=rows))),
        ("in", "s"): np.array(
            draw(st.lists(st.text(max_size=3), min_size=rows, max_size=rows)), dtype=object
        ),
        ("out", "v"): np.array(
            draw(st.lists(st.lists(floats, min_size=width, max_size=width), min_size=rows, max_size=rows)),
            dtype=np.float64,
        ).reshape(rows, width),
    }
    # A column of mixed JSON values, as a record batch may hold: numbers, null, text, lists.
    mixed = st.none() | st.booleans() | floats | st.text(max_size=2) | st.lists(st.integers(0, 3), max_size=2)
    values = draw(st.lists(mixed, min_size=rows, max_size=rows))
    column = np.empty(rows, dtype=object)
    column[:] = values
    columns[draw(st.sampled_from([("in", "s"), ("out", "p"), ("in", "x")]))] = column
    if draw(st.integers(min_value=0, max_value=4)) == 0:  # a column whose row count disagrees with the batch
        columns[("in", "x")] = np.zeros(rows + 1)
    return columns, rows


def compiled_or_refused(text: str) -> Any:
    try:
        return compile_expression(text)
    except ExpressionError as exc:
        event("refused when compiled")
        assert str(exc)
        return None


@given(st.text(max_size=80))
@example("(" * (MAX_DEPTH + 1) + "true" + ")" * (MAX_DEPTH + 1))
@example("-" * 2000)
@example('"\\')
def test_any_text(text: str) -> None:
    compiled_or_refused(text)


@given(near_valid(), frames())
@example("out.v[0] > 1e308 * 10", ({("out", "v"): np.ones((1, 1))}, 1))
@example("min(out.v) < 0", ({("out", "v"): np.ones((2, 0))}, 2))
# Found by a long run: min() of empty vectors in an empty batch raised numpy's ValueError.
@example("min(out.v) < 0", ({("out", "v"): np.ones((0, 0))}, 0))
@example("max(out.v) > 0 or true", ({("out", "v"): np.ones((0, 0))}, 0))
def test_near_valid_expressions_on_small_frames(
    text: str, frame: tuple[dict[tuple[str, str], Any], int]
) -> None:
    expression = compiled_or_refused(text)
    if expression is None:
        return
    columns, rows = frame
    try:
        result = expression.evaluate(columns, rows)
    except ExpressionError as exc:
        event("compiled, refused on evaluation")
        assert str(exc)
    else:
        event("compiled and evaluated")
        assert result.dtype == np.bool_ and result.shape == (rows,)
