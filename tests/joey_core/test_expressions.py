from __future__ import annotations

import inspect
import sys
from typing import Any

import numpy as np
import pytest

from joey_core.expressions import MAX_DEPTH, MAX_LENGTH, Expression, ExpressionError, compile_expression

NAN = float("nan")


def columns(**named: Any) -> dict[tuple[str, str], np.ndarray]:
    """``in_x=[...]`` -> {("in", "x"): array}."""
    result = {}
    for key, values in named.items():
        scope, name = key.split("_", 1)
        result[(scope, name)] = np.asarray(values)
    return result


def run(text: str, **named: Any) -> list[bool]:
    cols = columns(**named)
    rows = len(next(iter(cols.values()))) if cols else 1
    result = compile_expression(text).evaluate(cols, rows)
    assert result.dtype == np.bool_
    assert result.shape == (rows,)
    return result.tolist()


# --- operators and precedence ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 + 2 * 3 > 6", True),
        ("(1 + 2) * 3 == 9", True),
        ("1 + 2 * 3 == 7", True),
        ("10 - 4 - 3 == 3", True),  # left-associative
        ("12 / 4 / 3 == 1", True),
        ("7 % 3 == 1", True),
        ("-7 % 3 == 2", True),  # numpy/Python sign convention
        ("-2 * 3 == -6", True),
        ("- -2 == 2", True),
        ("2 - -2 == 4", True),
        ("1.5e1 == 15", True),
        (".5 < 1", True),
        ("1 / 2 == 0.5", True),  # true division, never floor
        ("1 <= 1 and 1 >= 1 and 1 < 2 and 2 > 1 and 1 != 2", True),
        ("true", True),
        ("false or true", True),
        ("not true", False),
        ("true == true", True),
        ("true != false", True),
    ],
)
def test_constant_arithmetic_and_comparisons(text: str, expected: bool) -> None:
    assert run(text, in_x=[0, 1]) == [expected, expected]


def test_not_binds_looser_than_comparison_and_tighter_than_and_or() -> None:
    a = [True, True, False, False, False]
    b = [False, True, True, False, True]
    c = [True, False, True, True, False]
    got = run("not in.a or in.b and in.c", in_a=a, in_b=b, in_c=c)
    assert got == [(not x) or (y and z) for x, y, z in zip(a, b, c, strict=True)]
    got = run("not (in.a or in.b) and in.c", in_a=a, in_b=b, in_c=c)
    assert got == [(not (x or y)) and z for x, y, z in zip(a, b, c, strict=True)]
    assert run("not in.x > 1", in_x=[0, 2]) == [True, False]
    assert run("not not in.a", in_a=[True, False]) == [True, False]


def test_unary_minus_binds_tighter_than_multiplication_and_indexing_tighter_than_minus() -> None:
    assert run("-in.x * 2 == -4", in_x=[2, 3]) == [True, False]
    assert run("-in.v[1] == -5", in_v=[[1, 5], [5, 1]]) == [True, False]
    assert run("-(in.x + 1) < 0", in_x=[0, -3]) == [True, False]


def test_numeric_ops_broadcast_per_row() -> None:
    # 2 rows of 2 values: a (rows,) column must line up with the batch axis, not the last axis.
    got = run("any(out.p - in.x > 0.5)", out_p=[[1.0, 0.0], [0.0, 0.2]], in_x=[0.0, 1.0])
    assert got == [True, False]
    got = run("all(in.a * in.b == in.c)", in_a=[[1, 2], [3, 4]], in_b=[[2, 2], [2, 2]], in_c=[[2, 4], [6, 9]])
    assert got == [True, False]


def test_and_or_on_vectors_is_elementwise() -> None:
    v = [[0.1, 0.9], [0.6, 0.7]]
    assert run("any(out.p > 0.5 and out.p < 0.8)", out_p=v) == [False, True]
    assert run("all(out.p < 0.2 or out.p > 0.8)", out_p=v) == [True, False]
    assert run("any(not (out.p > 0.5))", out_p=v) == [True, False]


# --- fields and indexing --------------------------------------------------------------------------


def test_indexing_first_per_row_axis_including_negative() -> None:
    probs = [[0.1, 0.2, 0.7], [0.995, 0.004, 0.001]]
    assert run("out.probabilities[0] > 0.99", out_probabilities=probs) == [False, True]
    assert run("out.probabilities[-1] > 0.5", out_probabilities=probs) == [True, False]
    assert run("out.probabilities[-3] == out.probabilities[0]", out_probabilities=probs) == [True, True]
    matrix = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    assert run("in.m[1][0] == 3", in_m=matrix) == [True, False]
    assert run("sum(in.m[1]) == 15", in_m=matrix) == [False, True]
    assert run("(in.v > 1)[1]", in_v=[[0, 2], [3, 0]]) == [True, False]
    assert run("abs(in.v)[0] == 3", in_v=[[-3, 0], [2, 0]]) == [True, False]


def test_fields_reports_referenced_fields() -> None:
    expression = compile_expression(
        "out.probabilities[0] > 0.99 and len(in.features) != 4 or in.features[0] < 0"
    )
    assert expression.fields == frozenset({("out", "probabilities"), ("in", "features")})
    assert expression.text == "out.probabilities[0] > 0.99 and len(in.features) != 4 or in.features[0] < 0"
    assert compile_expression("1 > 0").fields == frozenset()
    # keywords are fine as field names after the scope
    assert compile_expression("in.in == in.and").fields == frozenset({("in", "in"), ("in", "and")})


def test_extra_columns_are_ignored_and_column_is_not_mutated() -> None:
    flags = np.array([True, False])
    result = compile_expression("in.flag").evaluate({("in", "flag"): flags, ("in", "other"): np.zeros(2)}, 2)
    result[0] = False
    assert flags.tolist() == [True, False]


# --- functions ------------------------------------------------------------------------------------


def test_each_function() -> None:
    v = [[-1.0, 2.0, 3.0], [4.0, -5.0, 0.0]]
    assert run("len(in.v) == 3", in_v=v) == [True, True]
    assert run("len(in.m) == 6", in_m=np.zeros((2, 2, 3))) == [True, True]
    assert run("sum(in.v) == 4", in_v=v) == [True, False]
    assert run("mean(in.v) == 2 / 3", in_v=v) == [False, False]
    assert run("mean(in.v) > 1", in_v=v) == [True, False]
    assert run("min(in.v) == -1", in_v=v) == [True, False]
    assert run("max(in.v) == 4", in_v=v) == [False, True]
    assert run("any(in.v < 0)", in_v=[[1, -1], [1, 1]]) == [True, False]
    assert run("all(in.v > 0)", in_v=[[1, -1], [1, 1]]) == [False, True]
    assert run("abs(in.x) > 2", in_x=[-3, 1]) == [True, False]
    assert run("any(abs(in.v) > 4.5)", in_v=v) == [False, True]
    assert run("sum(in.v > 0) == 2", in_v=v) == [True, False]  # counting trues
    assert run("mean(in.flags) >= 0.5", in_flags=[[True, False], [False, False]]) == [True, False]
    assert run("sum(in.m) == 10", in_m=[[[1, 2], [3, 4]], [[0, 0], [0, 0]]]) == [True, False]


def test_reductions_of_a_per_row_scalar_are_the_value_itself() -> None:
    assert run("sum(in.x) == 2 and max(in.x) == 2 and mean(in.x) == 2", in_x=[2, 3]) == [True, False]
    assert run("any(in.b)", in_b=[True, False]) == [True, False]


def test_len_of_a_per_row_scalar_is_an_error() -> None:
    with pytest.raises(
        ExpressionError, match=r"len\(\) needs a vector, but in.x has one value per row at column 5"
    ):
        compile_expression("len(in.x) > 1").evaluate(columns(in_x=[1, 2]), 2)


def test_min_of_empty_vector_is_an_error_but_len_is_zero() -> None:
    empty = np.zeros((2, 0))
    assert run("len(in.v) == 0 and not any(in.v > 0) and all(in.v > 0)", in_v=empty) == [True, True]
    with pytest.raises(ExpressionError, match=r"min\(\) of an empty vector in.v"):
        compile_expression("min(in.v) > 0").evaluate({("in", "v"): empty}, 2)


# --- NaN, division, strings -----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["<", "<=", ">", ">=", "==", "!="])
def test_every_comparison_with_nan_is_false(op: str) -> None:
    assert run(f"in.x {op} 1", in_x=[NAN]) == [False]
    assert run(f"1 {op} in.x", in_x=[NAN]) == [False]
    assert run(f"in.x {op} in.x", in_x=[NAN]) == [False]


def test_nan_can_be_detected_and_not_equal_still_works_for_numbers() -> None:
    assert run("not (in.x == in.x)", in_x=[NAN, 1.0]) == [True, False]
    assert run("in.x != 1", in_x=[1, 2]) == [False, True]


def test_division_by_zero_follows_numpy_without_raising() -> None:
    with np.errstate(all="raise"):  # the expression must suppress warnings itself
        assert run("in.x / 0 > 1000", in_x=[1, -1, 0]) == [True, False, False]
        assert run("in.x % 0 == 0", in_x=[1, 0]) == [False, False]
        assert run("not (in.x / in.y == in.x / in.y)", in_x=[0, 1], in_y=[0, 1]) == [True, False]
        assert run("mean(in.v) > 0", in_v=np.zeros((1, 0))) == [False]


def test_integer_columns_do_not_wrap_around() -> None:
    assert run("in.a - in.b < 0", in_a=np.array([1], dtype=np.uint8), in_b=np.array([2], dtype=np.uint8)) == [
        True
    ]
    assert run("in.id == 9007199254740993", in_id=np.array([9007199254740993], dtype=np.int64)) == [True]


def test_string_equality() -> None:
    assert run('in.country == "US"', in_country=["US", "DE"]) == [True, False]
    assert run('"US" != in.country', in_country=["US", "DE"]) == [False, True]
    assert run('in.name == "say \\"hi\\" \\\\o/"', in_name=['say "hi" \\o/', "x"]) == [True, False]
    objects = np.array(["a", "b"], dtype=object)
    assert compile_expression('in.s == "b"').evaluate({("in", "s"): objects}, 2).tolist() == [False, True]
    assert run("in.a == in.b", in_a=["x", "y"], in_b=["x", "z"]) == [True, False]
    assert run('any(in.tags == "red")', in_tags=[["red", "blue"], ["green", "blue"]]) == [True, False]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('in.x > "a"', "a string can only be compared with == or != to a field holding text at column 8"),
        (
            'in.x + "a" == 1',
            "a string can only be compared with == or != to a field holding text at column 8",
        ),
        ('"a" == "a"', "a string can only be compared with == or != to a field holding text at column 1"),
        (
            'len(in.x) == "3"',
            "a string can only be compared with == or != to a field holding text at column 14",
        ),
        ('"a"', "check must evaluate to true/false, got text at column 1"),
    ],
)
def test_string_literals_are_only_for_equality_with_a_field(text: str, message: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(text)
    assert str(caught.value) == message


def test_string_literal_against_a_numeric_field_is_an_evaluation_error() -> None:
    with pytest.raises(
        ExpressionError, match=r"cannot compare in.x \(a number\) with \"a\" \(text\) at column 6"
    ):
        compile_expression('in.x == "a"').evaluate(columns(in_x=[1]), 1)
    with pytest.raises(ExpressionError, match=r"'\+' needs numbers, got in.s \(text\) at column 1"):
        compile_expression("in.s + 1 > 0").evaluate(columns(in_s=["a"]), 1)


# --- result shape and kind ------------------------------------------------------------------------


def test_vector_result_is_rejected_with_advice_to_reduce() -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression("out.p > 0.5").evaluate(columns(out_p=[[0.1, 0.2, 0.7]]), 1)
    assert str(caught.value) == (
        "check gives 3 values per row instead of one at column 1 "
        "(reduce out.p > 0.5 with any(...) or all(...))"
    )


@pytest.mark.parametrize(
    ("text", "got"),
    [("1 + 2", "a number"), ("-in.x", "a number"), ("sum(in.v)", "a number"), ("len(in.v)", "a number")],
)
def test_non_boolean_result_is_rejected_at_compile_time(text: str, got: str) -> None:
    with pytest.raises(ExpressionError, match=f"check must evaluate to true/false, got {got} at column 1"):
        compile_expression(text)


def test_field_result_must_hold_booleans() -> None:
    assert run("in.flag", in_flag=[True, False]) == [True, False]
    with pytest.raises(ExpressionError, match="check must evaluate to true/false, got a number at column 1"):
        compile_expression("out.label").evaluate(columns(out_label=[1, 2]), 2)
    with pytest.raises(ExpressionError, match=r"check must evaluate to true/false, got text at column 1"):
        compile_expression("in.s[0]").evaluate(columns(in_s=[["a"]]), 1)


def test_constant_result_is_broadcast_to_every_row() -> None:
    assert compile_expression("1 < 2").evaluate({}, 3).tolist() == [True, True, True]
    assert compile_expression("false").evaluate({}, 0).shape == (0,)


# --- evaluation errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cols", "message"),
    [
        (
            "out.probabilities[5] > 0.5",
            {"out_probabilities": [[0.1, 0.2, 0.7]]},
            "index 5 out of range for out.probabilities with 3 values at column 19",
        ),
        ("in.v[-3] > 0", {"in_v": [[1, 2]]}, "index -3 out of range for in.v with 2 values at column 6"),
        (
            "out.label[0] == 1",
            {"out_label": [1]},
            "cannot index out.label: it has one value per row at column 11",
        ),
        ("in.x > 0", {"in_y": [1]}, "missing field in.x at column 1 (it is not in this batch)"),
        ("in.x > 0", {"in_x": [1, 2]}, "field in.x has 2 rows, expected 1 at column 1"),
        ("in.x > 0", {"in_x": np.array(5)}, "field in.x has 0 rows, expected 1 at column 1"),
        (
            "any(in.a + in.b > 0)",
            {"in_a": [[1, 2, 3]], "in_b": [[1, 2, 3, 4]]},
            "cannot combine 3 values per row with 4 values per row at column 10",
        ),
        ("in.f and true", {"in_f": [1.5]}, "'and' needs true/false values, got in.f (a number) at column 1"),
        ("not in.f", {"in_f": [1.5]}, "'not' needs true/false values, got in.f (a number) at column 5"),
        ("in.b > 0", {"in_b": [True]}, "'>' needs numbers, got in.b (true/false) at column 1"),
        ("in.b == 1", {"in_b": [True]}, "cannot compare in.b (true/false) with 1 (a number) at column 6"),
        ("any(in.v)", {"in_v": [[1, 2]]}, r"any() needs true/false values, got in.v (a number) at column 5"),
        ("abs(in.b) > 0", {"in_b": [True]}, r"abs() needs numbers, got in.b (true/false) at column 5"),
        (
            "in.x > 0",
            {"in_x": np.array([{"a": 1}], dtype=object)},
            "field in.x holds values that are not numbers, true/false or text at column 1",
        ),
    ],
)
def test_evaluation_errors_name_the_problem_and_column(text: str, cols: dict[str, Any], message: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(text).evaluate(columns(**cols), 1)
    assert str(caught.value) == message


def test_object_columns_of_numbers_nulls_and_booleans_are_usable() -> None:
    numbers = np.array([None, 1.5], dtype=object)  # JSON null -> NaN
    flags = np.array([True, False], dtype=object)
    result = compile_expression("in.x > 2 or in.f").evaluate({("in", "x"): numbers, ("in", "f"): flags}, 2)
    assert result.tolist() == [True, False]
    assert compile_expression("in.x != 1").evaluate({("in", "x"): numbers}, 2).tolist() == [False, True]


# --- compile errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("(in.x > 1) and )", "unexpected ')' at column 16"),
        ("in.x > ", "unexpected end of expression at column 8"),
        ("in.x >> 1", "unexpected '>' at column 7"),
        ("in.x > 1 2", "unexpected number 2 at column 10"),
        ("(in.x > 1", "missing ')' for the '(' at column 1 (found end of expression at column 10)"),
        ("in.v[0 > 1", "missing ']' for the '[' at column 5 (found '>' at column 8)"),
        ("in.v[1.5] > 0", "index must be a whole number like [0] or [-1], got number 1.5 at column 6"),
        ("in.v[in.i] > 0", "index must be a whole number like [0] or [-1], got 'in' at column 6"),
        ("in.v[] > 0", "index must be a whole number like [0] or [-1], got ']' at column 6"),
        ("3[0] > 1", "cannot index a literal at column 2"),
        ("sum(in.v)[0] > 1", "cannot index sum(...): it gives one value per row at column 10"),
        (
            "foo(in.x) > 1",
            "unknown function 'foo' at column 1 (known: abs, all, any, len, max, mean, min, sum)",
        ),
        ("x > 1", "field must be in.<name> or out.<name>, got 'x' at column 1"),
        ("input.x > 1", "field must be in.<name> or out.<name>, got 'input' at column 1"),
        ("in > 1", "expected '.' after 'in' at column 4 (fields are in.<name> or out.<name>)"),
        ("out. > 1", "expected a field name after 'out.', got '>' at column 6"),
        ("in.1x > 1", "invalid number '1x' at column 4"),
        ("in.x.y > 1", "unexpected '.' at column 5 (fields have no attributes)"),
        ("len > 1", "expected '(' after 'len' at column 4"),
        ("len() > 1", "len() takes exactly one argument, got none at column 5"),
        ("max(in.a, in.b) > 1", "max() takes exactly one argument at column 9"),
        ("len(3) > 1", "len() needs a vector field, got a single value at column 5"),
        ("0 < in.x < 1", "chained comparisons are not allowed at column 10 (combine them with 'and')"),
        (
            "in.x == in.y == in.z",
            "chained comparisons are not allowed at column 14 (combine them with 'and')",
        ),
        ("in.x = 1", "unexpected character '=' at column 6 (use '==' to compare)"),
        ("!in.x", "unexpected character '!' at column 1 (use 'not', or '!=' to compare)"),
        ("in.a && in.b", "unexpected character '&' at column 6 (use 'and')"),
        ("in.a || in.b", "unexpected character '|' at column 6 (use 'or')"),
        ("in.s == 'a'", 'unexpected character "\'" at column 9 (strings use double quotes)'),
        ('in.s == "a', "unterminated string at column 9"),
        ('in.s == "a\\n"', 'unsupported escape in string at column 11 (only \\" and \\\\ are allowed)'),
        ("in.x > 1 and", "unexpected end of expression at column 13"),
        ("and in.x", "unexpected 'and' at column 1"),
        ("in.x == not in.y", "unexpected 'not' at column 9"),
        ("1 and in.x", "'and' needs true/false values, got 1 (a number) at column 1"),
        ("not 1", "'not' needs true/false values, got 1 (a number) at column 5"),
        ("true + 1 > 0", "'+' needs numbers, got true (true/false) at column 1"),
        ("-(in.x > 1)", "'-' needs numbers, got in.x > 1 (true/false) at column 3"),
        ("(in.x > 1) < 2", "'<' needs numbers, got in.x > 1 (true/false) at column 2"),
        ("true == 1", "cannot compare true/false with a number at column 6"),
        ("any(in.x + 1)", "any() needs true/false values, got in.x + 1 (a number) at column 5"),
        ("abs(in.x > 1) > 0", "abs() needs numbers, got in.x > 1 (true/false) at column 5"),
        (
            "in.x > 99999999999999999999",
            "integer 99999999999999999999 is too large at column 8 (at most 9223372036854775807)",
        ),
        ("in.x > 1 é", "unexpected character 'é' at column 10"),
        ("True", "field must be in.<name> or out.<name>, got 'True' at column 1"),
    ],
)
def test_malformed_expressions_are_explained_with_a_column(text: str, message: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(text)
    assert str(caught.value) == message


def test_error_carries_the_column_and_is_a_value_error() -> None:
    with pytest.raises(ValueError) as caught:
        compile_expression("(in.x > 1) and )")
    assert isinstance(caught.value, ExpressionError)
    assert caught.value.column == 16


def test_length_is_limited() -> None:
    text = " or ".join(["in.x > 1"] * 400)
    assert len(text) > MAX_LENGTH
    with pytest.raises(
        ExpressionError, match=rf"expression is too long \({len(text)} characters, at most 2000\)"
    ):
        compile_expression(text)


def test_nesting_is_limited_and_deepest_accepted_nesting_evaluates() -> None:
    deepest = "(" * MAX_DEPTH + "in.x" + ")" * MAX_DEPTH + " > 0"
    assert run(deepest, in_x=[1, -1]) == [True, False]
    with pytest.raises(
        ExpressionError, match=f"nested too deeply \\(more than {MAX_DEPTH} levels\\) at column 51"
    ):
        compile_expression("(" * (MAX_DEPTH + 1) + "in.x" + ")" * (MAX_DEPTH + 1) + " > 0")
    with pytest.raises(ExpressionError, match="nested too deeply"):
        compile_expression("not " * (MAX_DEPTH + 1) + "in.b")
    with pytest.raises(ExpressionError, match="nested too deeply"):
        compile_expression("-" * (MAX_DEPTH + 1) + "in.x > 0")


def test_worst_case_nesting_within_limits_does_not_exhaust_the_stack() -> None:
    # Each level spends its 5 allowed nesting steps and passes through every binding level: the deepest
    # syntax tree the limits allow. Level value: 1 - abs(1 + (inner > 0)), so -1 after one level, then 0.
    level = "(in.x + in.x * -abs(in.v[0] + mean(not {} <= 0 or in.b and not in.b)))"
    text = "{}"
    for _ in range(MAX_DEPTH // 5):
        text = text.format(level)
    text = text.format("in.x") + " == 0"
    assert len(text) <= MAX_LENGTH
    cols = {("in", "b"): np.array([False]), ("in", "x"): np.array([1.0]), ("in", "v"): np.array([[1.0]])}
    parens = "(" * MAX_DEPTH + "in.x" + ")" * MAX_DEPTH + " > 0"
    # Callers (gRPC handlers, the engine loop) have frames of their own: leave them 400 of the default 1000.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 600)
    try:
        assert compile_expression(text).evaluate(cols, 1).tolist() == [True]
        assert compile_expression(parens).evaluate(cols, 1).tolist() == [True]
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(ExpressionError, match="nested too deeply"):
        compile_expression(f"-{text}")


def test_long_flat_chains_evaluate() -> None:
    text = "in.x" + " + 1" * 450 + " > 450"
    assert len(text) <= MAX_LENGTH
    assert run(text, in_x=[1, 0]) == [True, False]


# --- safety ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        '__import__("os").system("true")',
        "in.__class__",
        "in.__class__ == in.x",
        "in.x.__class__",
        "out.probabilities.__len__() > 1",
        "lambda: 1",
        "(lambda x: x)(1)",
        'eval("1")',
        'exec("import os")',
        "open('/etc/passwd')",
        "[x for x in in.v]",
        "in.x if true else in.y",
        "in.x; import os",
        "globals()",
        "in.x ** 2 > 1",
        "in.x @ in.y",
        "{1: 2}",
        "in.x > 1 # comment",
        "`ls`",
        "in.x > 1\\\n",
    ],
)
def test_python_constructs_are_rejected(text: str) -> None:
    with pytest.raises(ExpressionError):
        compile_expression(text)


def test_dunder_field_names_are_rejected_with_a_reason() -> None:
    with pytest.raises(
        ExpressionError, match="field names may not start with '__', got '__class__' at column 4"
    ):
        compile_expression("in.__class__")


# --- vectorised batches ---------------------------------------------------------------------------


def test_large_batch_evaluates_in_one_pass() -> None:
    rows = 10_000
    rng = np.random.default_rng(7)
    probabilities = rng.dirichlet([1.0, 1.0, 1.0], size=rows).astype(np.float32)
    features = rng.normal(size=(rows, 4))
    features[::97, 2] = np.nan
    labels = probabilities.argmax(axis=1)
    country = np.where(np.arange(rows) % 3 == 0, "US", "DE")
    expression = compile_expression(
        'out.probabilities[0] > 0.9 or (in.features[2] > 1 and in.country == "US") '
        "or any(in.features < -2.5) or (out.label == 2 and abs(in.features[-1]) > 2)"
    )
    cols = {
        ("out", "probabilities"): probabilities,
        ("out", "label"): labels,
        ("in", "features"): features,
        ("in", "country"): country,
    }
    result = expression.evaluate(cols, rows)
    expected = np.array(
        [
            bool(p[0] > 0.9)
            or bool(f[2] > 1 and c == "US")
            or bool((f < -2.5).any())
            or bool(label == 2 and abs(f[-1]) > 2)
            for p, f, c, label in zip(probabilities, features, country, labels, strict=True)
        ]
    )
    assert result.shape == (rows,)
    assert result.dtype == np.bool_
    assert np.array_equal(result, expected)
    assert 0 < result.sum() < rows


def test_compiled_expression_is_reusable_and_immutable() -> None:
    expression = compile_expression("in.x > 1")
    assert isinstance(expression, Expression)
    assert expression.evaluate(columns(in_x=[0, 2]), 2).tolist() == [False, True]
    assert expression.evaluate(columns(in_x=[5]), 1).tolist() == [True]
    with pytest.raises(AttributeError):
        expression.text = "in.x > 2"  # type: ignore[misc]
    assert "in.x > 1" in repr(expression)
