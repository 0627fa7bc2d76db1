"""A small cron: five fields (minute hour day-of-month month day-of-week), ranges, steps, lists.

    >>> Cron.parse("*/15 2-4 * * mon-fri").next_after(datetime(2026, 11, 20, 2, 7))
    datetime.datetime(2026, 11, 20, 2, 15)

Fields accept ``*``, ``N``, ``A-B``, ``*/S``, ``A-B/S``, ``N/S`` (from N to the end), and lists of
those (``1,15,30-40/5``); months and weekdays accept names (``jan``, ``mon``); Sunday is 0 or 7.
As in Vixie cron, when both day-of-month and day-of-week are restricted, a day matching either
one fires. The macros ``@hourly``, ``@daily`` (``@midnight``), ``@weekly``, ``@monthly``,
``@yearly`` (``@annually``) are understood. Times are naive (the caller's clock, e.g. local or UTC).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ai_query import CronError

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
_FIELDS = (  # name, low, high, names
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)


def _number(text: str, field: str, low: int, high: int, names: dict[str, int]) -> int:
    value = names.get(text.lower())
    if value is None:
        if not text.isdigit():
            raise CronError(f"{field} {text!r} is not a number{' or a name' if names else ''} (allowed {low}-{high})")
        value = int(text)
    if not low <= value <= high:
        raise CronError(f"{field} {value} is out of range; allowed {low}-{high}")
    return value


def _parse_field(text: str, field: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{field} {text!r} has an empty list item; write e.g. 1,15")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise CronError(f"{field} step {step_text!r} must be a whole number >= 1, e.g. */15")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            start, end = _number(a, field, low, high, names), _number(b, field, low, high, names)
            if start > end:
                raise CronError(f"{field} range {base!r} runs backwards; write the smaller bound first")
        else:
            start = _number(base, field, low, high, names)
            end = high if slash else start
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression; :meth:`next_after` gives the next firing time."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, expression: str) -> "Cron":
        if not isinstance(expression, str) or not expression.strip():
            raise CronError("a cron expression needs five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *'")
        text = _MACROS.get(expression.strip().lower(), expression.strip())
        if text.startswith("@"):
            raise CronError(f"unknown cron macro {text!r}; use one of {', '.join(sorted(_MACROS))}")
        parts = text.split()
        if len(parts) != 5:
            raise CronError(
                f"cron expression {expression!r} has {len(parts)} field(s); it needs five: "
                "minute hour day-of-month month day-of-week, e.g. '0 2 * * *' (02:00 every day)"
            )
        parsed = [_parse_field(p, name, low, high, names) for p, (name, low, high, names) in zip(parts, _FIELDS)]
        weekdays = frozenset(d % 7 for d in parsed[4])
        return cls(expression.strip(), parsed[0], parsed[1], parsed[2], parsed[3], weekdays,
                   any_day=parts[2] == "*" or parts[2].startswith("*/") and parsed[2] == frozenset(range(1, 32)),
                   any_weekday=parts[4] == "*" or parts[4].startswith("*/") and weekdays == frozenset(range(7)))

    def _day_matches(self, when: datetime) -> bool:
        dom = when.day in self.days
        dow = (when.weekday() + 1) % 7 in self.weekdays
        if self.any_day and self.any_weekday:
            return True
        if self.any_day:
            return dow
        if self.any_weekday:
            return dom
        return dom or dow

    def matches(self, when: datetime) -> bool:
        return (when.minute in self.minutes and when.hour in self.hours and when.month in self.months
                and self._day_matches(when))

    def next_after(self, when: datetime) -> datetime:
        """The first firing time strictly after ``when`` (to the minute)."""
        t = when.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t + timedelta(days=366 * 5)  # e.g. '0 0 30 2 *' never fires
        while t < limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
                continue
            if not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
                continue
            if t.minute not in self.minutes:
                t += timedelta(minutes=1)
                continue
            return t
        raise CronError(f"cron expression {self.expression!r} never fires (e.g. a day that no month has)")

    def __str__(self) -> str:
        return self.expression


__all__ = ["Cron", "CronError"]
