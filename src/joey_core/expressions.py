"""The safe expression language of validation checks, e.g. ``out.probabilities[0] > 0.99``.

A check is tokenized and parsed by hand into a small AST once (``compile_expression``), then evaluated over a
whole batch with numpy: every field is a column whose first axis is the batch, so one pass answers every row.
User text never reaches eval/exec or Python's own parser; a check can only read the columns it is handed and
combine them with the operators and functions below.

Semantics worth knowing:
- Every comparison involving NaN is false, ``!=`` included, so NaN never flags a check by accident;
  ``not (x == x)`` is true exactly for NaN.
- Arithmetic is done in float64 with numpy's rules: division by zero gives inf/nan, never an exception.
- Per-row shapes broadcast from the batch axis outwards: ``out.p - in.x`` subtracts each row's ``x`` from each
  of that row's ``p`` values.
- Reductions (len, sum, mean, min, max, any, all) reduce every axis except the batch axis.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

MAX_LENGTH = 2000
"""Longest accepted expression, in characters: keeps compiling and evaluating cheap."""

MAX_DEPTH = 50
"""Deepest accepted nesting of parentheses, calls, indexes and unary operators (bounds recursion)."""

SCOPES = ("in", "out")
FUNCTIONS = ("abs", "all", "any", "len", "max", "mean", "min", "sum")
_KEYWORDS = ("and", "or", "not", "true", "false")
_ORDERINGS = ("<", "<=", ">", ">=")
_COMPARISONS = (*_ORDERINGS, "==", "!=")
_INT64_MAX = 2**63 - 1

Array = npt.NDArray[Any]


class ExpressionError(ValueError):
    """A check cannot be compiled or evaluated; the message names the problem and its column (1-based)."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.column = column


def _error(problem: str, pos: int, hint: str = "") -> ExpressionError:
    message = f"{problem} at column {pos + 1}"
    return ExpressionError(f"{message} ({hint})" if hint else message, pos + 1)


# --- tokens ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # "number", "string", "name", "op" or "end"
    text: str
    pos: int
    value: int | float | str | None = None


_NUMBER = re.compile(r"(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_NUMBER_TAIL = re.compile(r"[A-Za-z0-9_.]+", re.ASCII)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_OPERATORS = ("<=", ">=", "==", "!=", "<", ">", "+", "-", "*", "/", "%", "(", ")", "[", "]", ",", ".")
_MISTAKES = {
    "=": "use '==' to compare",
    "!": "use 'not', or '!=' to compare",
    "&": "use 'and'",
    "|": "use 'or'",
    "'": "strings use double quotes",
}


def _describe(token: _Token) -> str:
    if token.kind == "end":
        return "end of expression"
    if token.kind in ("number", "string"):
        return f"{token.kind} {token.text}"
    return f"'{token.text}'"


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char in " \t\r\n":
            pos += 1
        elif (char.isascii() and char.isdigit()) or (char == "." and _starts_number(text, pos, tokens)):
            tokens.append(_number(text, pos))
            pos += len(tokens[-1].text)
        elif char == '"':
            tokens.append(_string(text, pos))
            pos += len(tokens[-1].text)
        elif name := _NAME.match(text, pos):
            tokens.append(_Token("name", name.group(), pos))
            pos = name.end()
        elif operator := next((op for op in _OPERATORS if text.startswith(op, pos)), None):
            tokens.append(_Token("op", operator, pos))
            pos += len(operator)
        else:
            raise _error(f"unexpected character {char!r}", pos, _MISTAKES.get(char, ""))
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _starts_number(text: str, pos: int, tokens: list[_Token]) -> bool:
    # ".5" is a number, but the dot in "in.x" or "out.p[0].x" is an operator.
    after_value = bool(tokens) and (tokens[-1].kind == "name" or tokens[-1].text in (")", "]"))
    return not after_value and text[pos + 1 : pos + 2].isdigit()


def _number(text: str, pos: int) -> _Token:
    match = _NUMBER.match(text, pos)
    assert match is not None  # the caller saw a digit
    tail = _NUMBER_TAIL.match(text, match.end())
    if tail:
        raise _error(f"invalid number '{text[pos : tail.end()]}'", pos)
    literal = match.group()
    if any(c in literal for c in ".eE"):
        return _Token("number", literal, pos, float(literal))
    value = int(literal)
    if value > _INT64_MAX:
        raise _error(f"integer {literal} is too large", pos, f"at most {_INT64_MAX}")
    return _Token("number", literal, pos, value)


def _string(text: str, pos: int) -> _Token:
    chars: list[str] = []
    i = pos + 1
    while i < len(text) and text[i] != '"':
        if text[i] == "\\":
            if text[i + 1 : i + 2] not in ('"', "\\"):
                raise _error("unsupported escape in string", i, 'only \\" and \\\\ are allowed')
            i += 1
        chars.append(text[i])
        i += 1
    if i >= len(text):
        raise _error("unterminated string", pos)
    return _Token("string", text[pos : i + 1], pos, "".join(chars))


# --- syntax tree ----------------------------------------------------------------------------------


class _Kind(enum.Enum):
    BOOL = "true/false"
    NUMBER = "a number"
    STRING = "text"
    ANY = "a field"  # only known once the columns are seen


_WANTED = {_Kind.BOOL: "true/false values", _Kind.NUMBER: "numbers"}


@dataclass(frozen=True)
class _Node:
    start: int
    end: int


@dataclass(frozen=True)
class _Literal(_Node):
    value: bool | int | float | str


@dataclass(frozen=True)
class _Field(_Node):
    scope: str
    name: str


@dataclass(frozen=True)
class _Index(_Node):
    target: _Node
    index: int
    index_pos: int


@dataclass(frozen=True)
class _Call(_Node):
    function: str
    argument: _Node


@dataclass(frozen=True)
class _Negate(_Node):
    operand: _Node


@dataclass(frozen=True)
class _Not(_Node):
    operand: _Node


@dataclass(frozen=True)
class _Arithmetic(_Node):
    """``first op operand op operand ...``, left-associative; n-ary so long chains don't deepen recursion."""

    first: _Node
    rest: tuple[tuple[str, int, _Node], ...]  # (operator, its position, operand)


@dataclass(frozen=True)
class _Compare(_Node):
    left: _Node
    op: str
    op_pos: int
    right: _Node


@dataclass(frozen=True)
class _Logic(_Node):
    op: str  # "and" or "or"
    operands: tuple[_Node, ...]


def _static_kind(node: _Node) -> _Kind:
    if isinstance(node, _Literal):
        if isinstance(node.value, bool):
            return _Kind.BOOL
        return _Kind.STRING if isinstance(node.value, str) else _Kind.NUMBER
    if isinstance(node, _Index):
        return _static_kind(node.target)
    if isinstance(node, _Field):
        return _Kind.ANY
    if isinstance(node, _Call):
        return _Kind.BOOL if node.function in ("any", "all") else _Kind.NUMBER
    if isinstance(node, _Negate | _Arithmetic):
        return _Kind.NUMBER
    return _Kind.BOOL


def _kind_error(
    text: str, node: _Node, kind: _Kind, allowed: tuple[_Kind, ...], context: str
) -> ExpressionError:
    if kind is _Kind.STRING and isinstance(node, _Literal):
        return _error("a string can only be compared with == or != to a field holding text", node.start)
    wanted = " or ".join(_WANTED[k] for k in allowed)
    return _error(f"{context} needs {wanted}, got {text[node.start : node.end]} ({kind.value})", node.start)


# --- parser ---------------------------------------------------------------------------------------


class _Parser:
    """Recursive descent, loosest binding first: or, and, not, comparison, + -, * / %, unary -, [i], atoms."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._tokens = _tokenize(text)
        self._index = 0
        self._depth = 0
        self.fields: set[tuple[str, str]] = set()
        # partial() adds no Python frame per binding level: keeps MAX_DEPTH well inside the recursion limit.
        self._multiplicative: Callable[[], _Node] = partial(self._arithmetic, ("*", "/", "%"), self._unary)
        self._additive: Callable[[], _Node] = partial(self._arithmetic, ("+", "-"), self._multiplicative)
        self._and: Callable[[], _Node] = partial(self._logic, "and", self._not)
        self._or: Callable[[], _Node] = partial(self._logic, "or", self._and)

    @property
    def _token(self) -> _Token:
        return self._tokens[self._index]

    def _advance(self) -> _Token:
        token = self._token
        if token.kind != "end":
            self._index += 1
        return token

    def _at(self, kind: str, *texts: str) -> bool:
        return self._token.kind == kind and self._token.text in texts

    def _unexpected(self) -> ExpressionError:
        token = self._token
        return _error(f"unexpected {_describe(token)}", token.pos)

    @contextmanager
    def _nested(self, pos: int) -> Iterator[None]:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _error(f"expression is nested too deeply (more than {MAX_DEPTH} levels)", pos)
        try:
            yield
        finally:
            self._depth -= 1

    def _close(self, closer: str, opener: _Token) -> _Token:
        if not self._at("op", closer):
            found = f"found {_describe(self._token)} at column {self._token.pos + 1}"
            raise _error(f"missing '{closer}' for the '{opener.text}'", opener.pos, found)
        return self._advance()

    def _expect(self, node: _Node, allowed: tuple[_Kind, ...], context: str) -> None:
        kind = _static_kind(node)
        if kind is not _Kind.ANY and kind not in allowed:
            raise _kind_error(self._text, node, kind, allowed, context)

    def parse(self) -> _Node:
        if self._token.kind == "end":
            raise ExpressionError("empty expression")
        node = self._or()
        if self._token.kind != "end":
            raise self._unexpected()
        return node

    def _logic(self, op: str, operand: Callable[[], _Node]) -> _Node:
        operands = [operand()]
        while self._at("name", op):
            self._advance()
            operands.append(operand())
        if len(operands) == 1:
            return operands[0]
        for node in operands:
            self._expect(node, (_Kind.BOOL,), f"'{op}'")
        return _Logic(operands[0].start, operands[-1].end, op, tuple(operands))

    def _not(self) -> _Node:
        if not self._at("name", "not"):
            return self._comparison()
        token = self._advance()
        with self._nested(token.pos):
            operand = self._not()
        self._expect(operand, (_Kind.BOOL,), "'not'")
        return _Not(token.pos, operand.end, operand)

    def _comparison(self) -> _Node:
        left = self._additive()
        if not self._at("op", *_COMPARISONS):
            return left
        op = self._advance()
        right = self._additive()
        if self._at("op", *_COMPARISONS):
            raise _error("chained comparisons are not allowed", self._token.pos, "combine them with 'and'")
        self._check_comparison(left, op, right)
        return _Compare(left.start, right.end, left, op.text, op.pos, right)

    def _check_comparison(self, left: _Node, op: _Token, right: _Node) -> None:
        if op.text in _ORDERINGS:
            self._expect(left, (_Kind.NUMBER,), f"'{op.text}'")
            self._expect(right, (_Kind.NUMBER,), f"'{op.text}'")
            return
        kinds = (_static_kind(left), _static_kind(right))
        if _Kind.STRING in kinds:
            literal, other = (left, right) if kinds[0] is _Kind.STRING else (right, left)
            if _static_kind(other) is not _Kind.ANY:
                raise _kind_error(self._text, literal, _Kind.STRING, (), "")
        elif _Kind.ANY not in kinds and kinds[0] is not kinds[1]:
            raise _error(f"cannot compare {kinds[0].value} with {kinds[1].value}", op.pos)

    def _arithmetic(self, ops: tuple[str, ...], operand: Callable[[], _Node]) -> _Node:
        first = operand()
        rest: list[tuple[str, int, _Node]] = []
        while self._at("op", *ops):
            op = self._advance()
            rest.append((op.text, op.pos, operand()))
        if not rest:
            return first
        self._expect(first, (_Kind.NUMBER,), f"'{rest[0][0]}'")
        for op_text, _, node in rest:
            self._expect(node, (_Kind.NUMBER,), f"'{op_text}'")
        return _Arithmetic(first.start, rest[-1][2].end, first, tuple(rest))

    def _unary(self) -> _Node:
        if not self._at("op", "-"):
            return self._postfix()
        token = self._advance()
        with self._nested(token.pos):
            operand = self._unary()
        self._expect(operand, (_Kind.NUMBER,), "'-'")
        if isinstance(operand, _Literal) and isinstance(operand.value, int | float):
            return _Literal(token.pos, operand.end, -operand.value)
        return _Negate(token.pos, operand.end, operand)

    def _postfix(self) -> _Node:
        node = self._primary()
        while self._at("op", "["):
            bracket = self._advance()
            if isinstance(node, _Literal):
                raise _error("cannot index a literal", bracket.pos)
            if isinstance(node, _Call) and node.function != "abs":
                raise _error(f"cannot index {node.function}(...): it gives one value per row", bracket.pos)
            with self._nested(bracket.pos):
                index_pos = self._token.pos
                index = self._index_value()
            close = self._close("]", bracket)
            node = _Index(node.start, close.pos + 1, node, index, index_pos)
        return node

    def _index_value(self) -> int:
        sign = -1 if self._at("op", "-") else 1
        if sign < 0:
            self._advance()
        token = self._token
        if token.kind != "number" or not isinstance(token.value, int):
            raise _error(f"index must be a whole number like [0] or [-1], got {_describe(token)}", token.pos)
        self._advance()
        return sign * token.value

    def _primary(self) -> _Node:
        token = self._token
        if token.kind in ("number", "string"):
            self._advance()
            assert token.value is not None
            return _Literal(token.pos, token.pos + len(token.text), token.value)
        if self._at("op", "("):
            self._advance()
            with self._nested(token.pos):
                inner = self._or()
            self._close(")", token)
            return inner
        if token.kind != "name":
            raise self._unexpected()
        if token.text in ("true", "false"):
            self._advance()
            return _Literal(token.pos, token.pos + len(token.text), token.text == "true")
        if token.text in SCOPES:
            return self._field()
        if token.text in _KEYWORDS:
            raise self._unexpected()
        if self._tokens[self._index + 1].text == "(":
            if token.text not in FUNCTIONS:
                raise _error(f"unknown function '{token.text}'", token.pos, f"known: {', '.join(FUNCTIONS)}")
            return self._call()
        if token.text in FUNCTIONS:
            raise _error(f"expected '(' after '{token.text}'", token.pos + len(token.text))
        raise _error(f"field must be in.<name> or out.<name>, got '{token.text}'", token.pos)

    def _field(self) -> _Node:
        scope = self._advance()
        if not self._at("op", "."):
            raise _error(
                f"expected '.' after '{scope.text}'", self._token.pos, "fields are in.<name> or out.<name>"
            )
        self._advance()
        name = self._token
        if name.kind != "name":
            raise _error(f"expected a field name after '{scope.text}.', got {_describe(name)}", name.pos)
        if name.text.startswith("__"):
            raise _error(f"field names may not start with '__', got '{name.text}'", name.pos)
        self._advance()
        if self._at("op", "."):
            raise _error("unexpected '.'", self._token.pos, "fields have no attributes")
        self.fields.add((scope.text, name.text))
        return _Field(scope.pos, name.pos + len(name.text), scope.text, name.text)

    def _call(self) -> _Node:
        name = self._advance()
        opener = self._advance()
        if self._at("op", ")"):
            raise _error(f"{name.text}() takes exactly one argument, got none", self._token.pos)
        with self._nested(opener.pos):
            argument = self._or()
        if self._at("op", ","):
            raise _error(f"{name.text}() takes exactly one argument", self._token.pos)
        close = self._close(")", opener)
        context = f"{name.text}()"
        if name.text == "len" and isinstance(argument, _Literal):
            raise _error("len() needs a vector field, got a single value", argument.start)
        if name.text in ("any", "all"):
            self._expect(argument, (_Kind.BOOL,), context)
        elif name.text in ("sum", "mean"):
            self._expect(argument, (_Kind.NUMBER, _Kind.BOOL), context)
        elif name.text != "len":
            self._expect(argument, (_Kind.NUMBER,), context)
        return _Call(name.pos, close.pos + 1, name.text, argument)


# --- evaluation -----------------------------------------------------------------------------------


class _Value(NamedTuple):
    data: Array  # batch-first (rows, ...), or 0-d for a value that is the same for every row
    kind: _Kind


def _not_equal_numbers(a: Array, b: Array) -> Array:
    # IEEE makes NaN != x true; checks treat every comparison with NaN as false.
    return np.not_equal(a, b) & ~(np.isnan(a) | np.isnan(b))


def _equal_text(a: Array, b: Array) -> Array:
    # The == operator, unlike np.equal, compares str arrays on every supported numpy version.
    return np.asarray(a == b)


def _not_equal_text(a: Array, b: Array) -> Array:
    return np.asarray(a != b)


_ARITHMETIC: dict[str, Callable[[Array, Array], Array]] = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.true_divide,
    "%": np.remainder,
}
_COMPARE: dict[str, Callable[[Array, Array], Array]] = {
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
}
_LOGIC: dict[str, Callable[[Array, Array], Array]] = {"and": np.logical_and, "or": np.logical_or}
_REDUCE: dict[str, Callable[..., Array]] = {
    "sum": np.sum,
    "min": np.min,
    "max": np.max,
    "any": np.any,
    "all": np.all,
}


def _per_row(data: Array) -> str:
    if data.ndim == 0:
        return "a single value"
    if data.ndim == 1:
        return "one value per row"
    return f"{'x'.join(map(str, data.shape[1:]))} values per row"


def _align(a: Array, b: Array) -> tuple[Array, Array]:
    """Pad the lower-rank batch array with trailing axes so numpy broadcasts per row, not from the right."""
    if a.ndim and b.ndim and a.ndim != b.ndim:
        if a.ndim < b.ndim:
            a = a.reshape(a.shape + (1,) * (b.ndim - a.ndim))
        else:
            b = b.reshape(b.shape + (1,) * (a.ndim - b.ndim))
    return a, b


def _classify(data: Array) -> tuple[_Kind, Array] | None:
    kind = data.dtype.kind
    if kind == "b":
        return _Kind.BOOL, data
    if kind in "iuf":
        return _Kind.NUMBER, data
    if kind in "US":
        return _Kind.STRING, data.astype(np.str_)
    if kind != "O":
        return None
    if data.size == 0:
        return _Kind.NUMBER, data.astype(np.float64)
    values = data.ravel()
    if all(isinstance(v, str) for v in values):
        return _Kind.STRING, data.astype(np.str_)
    if all(isinstance(v, bool | np.bool_) for v in values):
        return _Kind.BOOL, data.astype(np.bool_)
    try:
        # None (JSON null) becomes NaN, which no comparison matches.
        return _Kind.NUMBER, data.astype(np.float64)
    except (TypeError, ValueError):
        return None


class _Evaluator:
    def __init__(self, text: str, columns: Mapping[tuple[str, str], Array], rows: int) -> None:
        self._text = text
        self._columns = columns
        self._rows = rows
        self._loaded: dict[tuple[str, str], _Value] = {}

    def _source(self, node: _Node) -> str:
        return self._text[node.start : node.end]

    def result(self, root: _Node) -> npt.NDArray[np.bool_]:
        value = self._eval(root)
        if value.kind is not _Kind.BOOL:
            raise _error(f"check must evaluate to true/false, got {value.kind.value}", root.start)
        if value.data.ndim > 1:
            raise _error(
                f"check gives {_per_row(value.data)} instead of one",
                root.start,
                f"reduce {self._source(root)} with any(...) or all(...)",
            )
        if value.data.ndim == 0:
            return np.full(self._rows, bool(value.data))
        return np.array(value.data, dtype=np.bool_)

    def _eval(self, node: _Node) -> _Value:
        if isinstance(node, _Literal):
            return self._literal(node.value)
        if isinstance(node, _Field):
            return self._field(node)
        if isinstance(node, _Index):
            return self._index(node)
        if isinstance(node, _Call):
            return self._call(node)
        if isinstance(node, _Negate):
            return _Value(np.negative(self._numbers(node.operand, "'-'")), _Kind.NUMBER)
        if isinstance(node, _Not):
            return _Value(np.logical_not(self._typed(node.operand, (_Kind.BOOL,), "'not'").data), _Kind.BOOL)
        if isinstance(node, _Arithmetic):
            return self._arithmetic(node)
        if isinstance(node, _Compare):
            return self._compare(node)
        if isinstance(node, _Logic):
            return self._logic(node)
        raise TypeError(f"unknown expression node {node!r}")

    @staticmethod
    def _literal(value: bool | int | float | str) -> _Value:
        if isinstance(value, bool):
            return _Value(np.asarray(value), _Kind.BOOL)
        if isinstance(value, str):
            return _Value(np.asarray(value, dtype=np.str_), _Kind.STRING)
        return _Value(
            np.asarray(value, dtype=np.int64 if isinstance(value, int) else np.float64), _Kind.NUMBER
        )

    def _field(self, node: _Field) -> _Value:
        key = (node.scope, node.name)
        if key in self._loaded:
            return self._loaded[key]
        name = f"{node.scope}.{node.name}"
        if key not in self._columns:
            raise _error(f"missing field {name}", node.start, "it is not in this batch")
        data = np.asarray(self._columns[key])
        if data.ndim == 0 or data.shape[0] != self._rows:
            rows = data.shape[0] if data.ndim else 0
            raise _error(f"field {name} has {rows} rows, expected {self._rows}", node.start)
        classified = _classify(data)
        if classified is None:
            raise _error(f"field {name} holds values that are not numbers, true/false or text", node.start)
        self._loaded[key] = _Value(classified[1], classified[0])
        return self._loaded[key]

    def _typed(self, node: _Node, allowed: tuple[_Kind, ...], context: str) -> _Value:
        value = self._eval(node)
        if value.kind not in allowed:
            raise _kind_error(self._text, node, value.kind, allowed, context)
        return value

    def _numbers(self, node: _Node, context: str) -> Array:
        return self._typed(node, (_Kind.NUMBER,), context).data.astype(np.float64, copy=False)

    def _combine(self, fn: Callable[[Array, Array], Array], left: Array, right: Array, at: int) -> Array:
        a, b = _align(left, right)
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise _error(f"cannot combine {_per_row(left)} with {_per_row(right)}", at) from None
        return fn(a, b)

    def _index(self, node: _Index) -> _Value:
        value = self._eval(node.target)
        source = self._source(node.target)
        if value.data.ndim < 2:
            raise _error(f"cannot index {source}: it has one value per row", node.index_pos)
        size = value.data.shape[1]
        if not -size <= node.index < size:
            raise _error(f"index {node.index} out of range for {source} with {size} values", node.index_pos)
        return _Value(value.data[:, node.index], value.kind)

    def _call(self, node: _Call) -> _Value:
        name, context = node.function, f"{node.function}()"
        if name == "len":
            data = self._eval(node.argument).data
            if data.ndim < 2:
                source = self._source(node.argument)
                raise _error(f"len() needs a vector, but {source} has one value per row", node.argument.start)
            return _Value(np.full(self._rows, math.prod(data.shape[1:]), dtype=np.int64), _Kind.NUMBER)
        if name == "abs":
            return _Value(np.abs(self._numbers(node.argument, context)), _Kind.NUMBER)
        if name in ("any", "all"):
            value = self._typed(node.argument, (_Kind.BOOL,), context)
        elif name in ("sum", "mean"):
            data = self._typed(node.argument, (_Kind.NUMBER, _Kind.BOOL), context).data
            value = _Value(data.astype(np.float64), _Kind.NUMBER)
        else:
            value = self._typed(node.argument, (_Kind.NUMBER,), context)
        data = value.data
        if data.ndim < 2:
            return value
        if name in ("min", "max") and math.prod(data.shape[1:]) == 0:
            if self._rows:
                raise _error(
                    f"{context} of an empty vector {self._source(node.argument)}", node.argument.start
                )
            # An empty batch of empty vectors: numpy refuses even this empty reduction (found by tests/fuzz).
            return _Value(np.empty(0, dtype=data.dtype), value.kind)
        axes = tuple(range(1, data.ndim))
        if name == "mean":
            # sum / count instead of np.mean: an empty vector gives nan without np.mean's Python warning.
            return _Value(np.sum(data, axis=axes) / math.prod(data.shape[1:]), value.kind)
        return _Value(np.asarray(_REDUCE[name](data, axis=axes)), value.kind)

    def _arithmetic(self, node: _Arithmetic) -> _Value:
        result = self._numbers(node.first, f"'{node.rest[0][0]}'")
        for op, pos, operand in node.rest:
            result = self._combine(_ARITHMETIC[op], result, self._numbers(operand, f"'{op}'"), pos)
        return _Value(result, _Kind.NUMBER)

    def _compare(self, node: _Compare) -> _Value:
        if node.op in _ORDERINGS:
            left = self._typed(node.left, (_Kind.NUMBER,), f"'{node.op}'")
            right = self._typed(node.right, (_Kind.NUMBER,), f"'{node.op}'")
        else:
            left, right = self._eval(node.left), self._eval(node.right)
            if left.kind is not right.kind:
                raise _error(
                    f"cannot compare {self._source(node.left)} ({left.kind.value}) "
                    f"with {self._source(node.right)} ({right.kind.value})",
                    node.op_pos,
                )
        compare = _COMPARE[node.op]
        if node.op == "!=" and left.kind is _Kind.NUMBER:
            compare = _not_equal_numbers
        elif left.kind is _Kind.STRING:
            compare = _equal_text if node.op == "==" else _not_equal_text
        return _Value(self._combine(compare, left.data, right.data, node.op_pos), _Kind.BOOL)

    def _logic(self, node: _Logic) -> _Value:
        context = f"'{node.op}'"
        result = self._typed(node.operands[0], (_Kind.BOOL,), context).data
        for operand in node.operands[1:]:
            right = self._typed(operand, (_Kind.BOOL,), context).data
            result = self._combine(_LOGIC[node.op], result, right, operand.start)
        return _Value(result, _Kind.BOOL)


# --- public API -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expression:
    """A compiled check: evaluate it on a batch's columns to get one true/false per row."""

    text: str
    fields: frozenset[tuple[str, str]]
    _root: _Node = field(repr=False, compare=False)

    def evaluate(self, columns: Mapping[tuple[str, str], Array], rows: int) -> npt.NDArray[np.bool_]:
        """Evaluate over a batch. ``columns[(scope, name)]`` has the batch as its first axis."""
        with np.errstate(all="ignore"):
            return _Evaluator(self.text, columns, rows).result(self._root)


def compile_expression(text: str) -> Expression:
    """Parse and type-check ``text`` once; raise ExpressionError naming the problem and its column."""
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is too long ({len(text)} characters, at most {MAX_LENGTH})")
    parser = _Parser(text)
    root = parser.parse()
    kind = _static_kind(root)
    if kind in (_Kind.NUMBER, _Kind.STRING):
        raise _error(f"check must evaluate to true/false, got {kind.value}", root.start)
    return Expression(text, frozenset(parser.fields), root)
