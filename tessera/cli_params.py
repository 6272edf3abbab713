"""click parameter types that refuse, at parse time, values the commands cannot use.

A bad value then fails the way click fails a usage error: exit code 2 and one line naming the
flag and the valid range ("Invalid value for '--rate-scale': inf is not in the range
0.001<=x<=10000"), before anything is loaded or simulated. click's own FloatRange lets NaN
through (every comparison with NaN is false) and, with an open end, infinity; FiniteFloatRange
does not.
"""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """A float in a range, and finite: no NaN, no infinity."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            described = self._describe_range()
            where = f" in the range {described}" if described != "x" else ""
            self.fail(f"{value} is not a finite number{where}.", param, ctx)
        return number

    def _describe_range(self) -> str:
        if self.min is None and self.max is None:
            return "x"
        return super()._describe_range()


class ParsedText(click.ParamType):
    """A text option parsed by a function that raises ValueError naming what it expected."""

    def __init__(self, name: str, parse: Any) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def assignments(
    values: tuple[str, ...], param_hint: str, parse_value: Any, what: str
) -> dict[str, Any]:
    """`NAME=VALUE` options as a mapping; a usage error for a malformed or repeated one.

    `parse_value` turns the text after '=' into the value, raising ValueError naming the range.
    """
    parsed: dict[str, Any] = {}
    for value in values:
        name, equals, text = value.partition("=")
        if not name or not equals:
            raise click.BadParameter(f"expected CLASS={what}, got {value!r}", param_hint=param_hint)
        if name in parsed:
            raise click.BadParameter(f"{name} is given twice", param_hint=param_hint)
        try:
            parsed[name] = parse_value(text)
        except ValueError as error:
            raise click.BadParameter(f"{value!r}: {error}", param_hint=param_hint) from None
    return parsed
