"""Whether resolved pipeline steps fit together: model steps chain, validations steps compile and
read only fields that exist. Every error names the step (and check) and what is wrong."""

from __future__ import annotations

import re
from collections.abc import Sequence

from joey.expressions import ExpressionError, compile_expression
from joey_registry.domain import ResolvedStep, Step, TensorSpec, ValidationsStep
from joey_registry.errors import InvalidArgument
from joey_registry.validation import dtypes_compatible

CHECK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_CHECK_NAME = 63
# Outputs carry anomaly.count next to anomaly.<name>, so a check may not be named "count".
RESERVED_CHECK_NAMES = frozenset({"count"})


def describe(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{s.name!r} ({s.dtype})" for s in specs) or "nothing"


def _label(number: int, step: ResolvedStep) -> str:
    return f"step {number} ({step.model} v{step.version})"


def check_steps(steps: Sequence[Step]) -> None:
    """A model step is fed the outputs of the last model step before it (validations steps in
    between pass records through); a validations step's ``out.*`` are that model step's outputs."""
    if not any(isinstance(s, ResolvedStep) for s in steps):
        raise InvalidArgument("a pipeline needs at least one model step")
    previous: tuple[int, ResolvedStep] | None = None
    named: dict[str, int] = {}
    for number, step in enumerate(steps, 1):
        if isinstance(step, ValidationsStep):
            _check_validations(number, step, previous, named)
            continue
        if previous is not None:
            _check_feeds(previous, number, step)
        previous = number, step


def _check_feeds(previous: tuple[int, ResolvedStep], number: int, step: ResolvedStep) -> None:
    source_number, source = previous
    produced = {o.name: o for o in source.outputs}
    for needed in step.inputs:
        where = f"{_label(number, step)} needs input {needed.name!r} ({needed.dtype})"
        out = produced.get(needed.name)
        if out is None:
            raise InvalidArgument(
                f"{where}, but {_label(source_number, source)} produces only {describe(source.outputs)}"
            )
        if not dtypes_compatible(out.dtype, needed.dtype):
            raise InvalidArgument(
                f"{where}, but {_label(source_number, source)} produces {out.name!r} as {out.dtype}"
            )


def _check_validations(
    number: int, step: ValidationsStep, previous: tuple[int, ResolvedStep] | None, named: dict[str, int]
) -> None:
    if not step.checks:
        raise InvalidArgument(f"step {number}: a validations step needs at least one check")
    for name, text in step.checks:
        where = f"step {number}: check {name!r}"
        _check_name(number, name, named)
        try:
            expression = compile_expression(text)
        except ExpressionError as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
        outs = sorted(field for scope, field in expression.fields if scope == "out")
        if not outs:
            continue
        reads = ", ".join(f"out.{o}" for o in outs)
        if previous is None:
            raise InvalidArgument(
                f"{where} reads {reads}, but no model step comes before it; "
                "put the validations step after the model step whose outputs it checks"
            )
        source_number, source = previous
        produced = {o.name for o in source.outputs}
        missing = [o for o in outs if o not in produced]
        if missing:
            raise InvalidArgument(
                f"{where} reads {', '.join(f'out.{o}' for o in missing)}, but "
                f"{_label(source_number, source)} produces only {describe(source.outputs)}"
            )


def _check_name(number: int, name: str, named: dict[str, int]) -> None:
    if not CHECK_NAME.fullmatch(name) or len(name) > MAX_CHECK_NAME:
        raise InvalidArgument(
            f"step {number}: invalid check name {name!r}: use letters, digits and underscores, "
            f"not starting with a digit, at most {MAX_CHECK_NAME} characters"
        )
    if name in RESERVED_CHECK_NAMES:
        raise InvalidArgument(
            f"step {number}: check name {name!r} is reserved (outputs carry anomaly.{name}); choose another"
        )
    if name in named:
        raise InvalidArgument(
            f"step {number}: check {name!r} is already defined in step {named[name]}; "
            "check names must be unique in a pipeline"
        )
    named[name] = number
