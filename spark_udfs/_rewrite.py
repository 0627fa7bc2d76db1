"""Find ``ai_query(...)`` calls in SQL text and rewrite them into typed UDF variants.

A Spark UDF's return type is fixed when it is registered, but ``ai_query``'s result type depends
on its arguments (``returnType``, ``failOnError``, the endpoint's task). The scanner below finds
each call (outside string literals, quoted identifiers and comments), reads its arguments, and
lets the caller replace the function name with a variant registered for the right type. Either
only the function name changes (every argument passed through untouched), or, for a variant that
takes its arguments by position, the whole call is rewritten with the argument texts in the
variant's order (``replace_calls``; refused when that would move a ``?`` parameter marker).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ._conditions import argument_error

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Argument:
    text: str
    name: str | None = None  # set for ``name => value``

    @property
    def literal(self) -> object:
        """The Python value of a simple literal argument, or ``NotImplemented`` for an expression."""
        return parse_literal(self.text)


@dataclass
class Call:
    name: str
    start: int  # offset of the function name
    name_end: int
    end: int  # offset just past the closing parenthesis
    args: list[Argument] = field(default_factory=list)


def _skip_quoted(sql: str, i: int) -> int:
    """Index just past the literal or quoted identifier starting at ``sql[i]``."""
    quote = sql[i]
    j = i + 1
    while j < len(sql):
        c = sql[j]
        if c == "\\" and quote != "`":
            j += 2
            continue
        if c == quote:
            if j + 1 < len(sql) and sql[j + 1] == quote:  # doubled quote escapes itself
                j += 2
                continue
            return j + 1
        j += 1
    raise argument_error("AI_QUERY_SQL_SYNTAX", f"unterminated {quote} quote in SQL starting at offset {i}: {sql[i:i + 40]!r}")


def _skip_comment(sql: str, i: int) -> int:
    if sql.startswith("--", i):
        j = sql.find("\n", i)
        return len(sql) if j < 0 else j + 1
    j = sql.find("*/", i + 2)
    if j < 0:
        raise argument_error("AI_QUERY_SQL_SYNTAX", f"unterminated /* comment in SQL at offset {i}")
    return j + 2


def _tokens_outside_literals(sql: str):
    """Yield (index, char) of characters that are not inside literals or comments."""
    i = 0
    while i < len(sql):
        c = sql[i]
        if c in "'\"`":
            i = _skip_quoted(sql, i)
            continue
        if sql.startswith("--", i) or sql.startswith("/*", i):
            i = _skip_comment(sql, i)
            continue
        yield i, c
        i += 1


def _parse_args(sql: str, open_paren: int) -> tuple[list[Argument], int]:
    depth = 0
    pieces: list[tuple[int, int]] = []
    start = open_paren + 1
    for i, c in _tokens_outside_literals_from(sql, open_paren):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                pieces.append((start, i))
                args = []
                for a, b in pieces:
                    text = _without_comments(sql[a:b]).strip()
                    if not text:
                        continue
                    m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=>\s*(.*)$", text, re.S)
                    args.append(Argument(m.group(2).strip(), m.group(1)) if m else Argument(text))
                return args, i + 1
        elif c == "," and depth == 1:
            pieces.append((start, i))
            start = i + 1
    raise argument_error("AI_QUERY_SQL_SYNTAX", f"unbalanced parentheses in SQL after offset {open_paren}: {sql[open_paren:open_paren + 60]!r}")


def _without_comments(text: str) -> str:
    """``text`` with its comments blanked, so a commented argument still reads as a literal."""
    if "--" not in text and "/*" not in text:
        return text
    kept = [" "] * len(text)
    i = 0
    while i < len(text):
        if text[i] in "'\"`":
            j = _skip_quoted(text, i)
            kept[i:j] = text[i:j]
            i = j
        elif text.startswith("--", i) or text.startswith("/*", i):
            i = _skip_comment(text, i)
        else:
            kept[i] = text[i]
            i += 1
    return "".join(kept)


def _tokens_outside_literals_from(sql: str, start: int):
    for i, c in _tokens_outside_literals(sql[start:]):
        yield start + i, c


def find_calls(sql: str, names: set[str]) -> list[Call]:
    """Every call of a function in ``names`` (case-insensitive), outermost and nested alike."""
    lowered = {n.lower() for n in names}
    calls: list[Call] = []
    for i, c in _tokens_outside_literals(sql):
        if not (c.isalpha() or c == "_") or (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] in "_.`$")):
            continue
        m = _IDENT.match(sql, i)
        if m is None or m.group(0).lower() not in lowered:
            continue
        j = m.end()
        while j < len(sql) and sql[j].isspace():
            j += 1
        if j < len(sql) and sql[j] == "(":
            args, end = _parse_args(sql, j)
            calls.append(Call(m.group(0), i, m.end(), end, args))
    return calls


_STRING = re.compile(r"^'((?:[^'\\]|\\.|'')*)'$", re.S)
_DQ_STRING = re.compile(r'^"((?:[^"\\]|\\.|"")*)"$', re.S)


def parse_literal(text: str) -> object:
    """Python value of a SQL literal (string, number, boolean, NULL, named_struct of literals)."""
    t = text.strip()
    m = _STRING.match(t) or _DQ_STRING.match(t)
    if m:
        q = t[0]
        return re.sub(r"\\(.)", r"\1", m.group(1).replace(q * 2, q))
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    try:
        return int(t)
    except ValueError:
        pass
    if re.match(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?[dDfF]?$", t):
        return float(t.rstrip("dDfF"))
    m = re.match(r"^(named_struct|struct)\s*\((.*)\)$", t, re.S | re.I)
    if m and m.group(1).lower() == "named_struct":
        inner_args, _ = _parse_args("(" + m.group(2) + ")", 0)
        values = [a.literal for a in inner_args]
        if len(values) % 2 or NotImplemented in values:
            return NotImplemented
        out = {}
        for k, v in zip(values[0::2], values[1::2]):
            if not isinstance(k, str):
                return NotImplemented
            if k in out:  # Spark keeps both fields; Arrow then fails on an executor, far from the cause
                raise argument_error("AI_QUERY_INVALID_ARGUMENT", f"named_struct(...): the field {k!r} is given twice; give each field once")
            out[k] = v
        return out
    m = re.match(r"^map\s*\((.*)\)$", t, re.S | re.I)
    if m:  # as Arrow gives a MAP to Python: a list of (key, value) pairs, so it is never taken for a named_struct
        inner_args, _ = _parse_args("(" + m.group(1) + ")", 0)
        values = [a.literal for a in inner_args]
        if len(values) % 2 or NotImplemented in values:
            return NotImplemented
        return list(zip(values[0::2], values[1::2]))
    m = re.match(r"^array\s*\((.*)\)$", t, re.S | re.I)
    if m:
        inner_args, _ = _parse_args("(" + m.group(1) + ")", 0)
        values = [a.literal for a in inner_args]
        return NotImplemented if NotImplemented in values else values
    return NotImplemented


def bind_arguments(call: Call, signature: list[str], required: int) -> dict[str, Argument]:
    """Map a call's positional and named arguments onto ``signature``; errors name the argument."""
    bound: dict[str, Argument] = {}
    seen_named = False
    for position, arg in enumerate(call.args):
        if arg.name is None:
            if seen_named:
                raise argument_error("AI_QUERY_WRONG_ARGUMENTS", f"{call.name}: a positional argument ({arg.text!r}) follows a named one; name it too")
            if position >= len(signature):
                raise argument_error("AI_QUERY_WRONG_ARGUMENTS", f"{call.name} takes at most {len(signature)} arguments ({', '.join(signature)}), got {len(call.args)}")
            bound[signature[position]] = arg
        else:
            seen_named = True
            match = {s.lower(): s for s in signature}.get(arg.name.lower())
            if match is None:
                raise argument_error("AI_QUERY_WRONG_ARGUMENTS", 
                    f"{call.name}: unknown named argument {arg.name!r}; the arguments are {', '.join(signature)}"
                )
            if match in bound:
                raise argument_error("AI_QUERY_WRONG_ARGUMENTS", f"{call.name}: argument {match!r} is given twice (by position or by name); give it once")
            bound[match] = arg
    missing = [s for s in signature[:required] if s not in bound]
    if missing:
        raise argument_error("AI_QUERY_WRONG_ARGUMENTS", f"{call.name}: missing required argument(s) {', '.join(missing)}; the arguments are {', '.join(signature)}")
    return bound


def replace_names(sql: str, replacements: dict[int, str], calls: list[Call], wrappers: dict[int, str] | None = None) -> str:
    """Replace the function name of the calls whose start offset is in ``replacements``; a call
    whose start is in ``wrappers`` is also wrapped in that function (``parse_json(...)``)."""
    edits: list[tuple[int, int, str]] = []  # (start, end, text); nested calls' edits never overlap
    wrappers = wrappers or {}
    for call in calls:
        if call.start in replacements:
            edits.append((call.start, call.name_end, wrappers.get(call.start, "") + ("(" if call.start in wrappers else "")
                          + replacements[call.start]))
            if call.start in wrappers:
                edits.append((call.end, call.end, ")"))
    out = []
    last = 0
    for start, end, text in sorted(edits, key=lambda e: (e[0], e[1])):
        out.append(sql[last:start])
        out.append(text)
        last = end
    out.append(sql[last:])
    return "".join(out)


def replace_calls(sql: str, replacements: dict[int, str], calls: list[Call]) -> str:
    """Replace the whole text of the (non-nested) calls whose start offset is in ``replacements``."""
    out = []
    last = 0
    for call in sorted(calls, key=lambda c: c.start):
        if call.start in replacements:
            if call.start < last:
                raise ValueError("internal error: nested calls cannot be replaced whole")
            out.append(sql[last:call.start])
            out.append(replacements[call.start])
            last = call.end
    out.append(sql[last:])
    return "".join(out)


def has_positional_marker(text: str) -> bool:
    """Whether ``text`` holds a ``?`` parameter marker (outside literals and comments)."""
    return any(c == "?" for _, c in _tokens_outside_literals(text))



def legacy_named(call: Call, signature: list[str]) -> list[Argument] | None:
    """The arguments of a legacy key/value call (``ai_query('ep', req, 'returnType', 'STRING', ...)``)
    as named ones, or ``None`` when ``call`` is not in that form.

    Databricks' first ``ai_query`` took its options as string keys each followed by its value;
    a third positional argument that names an option (no DDL type is called ``returnType``)
    marks the form. The keys then map onto the named arguments, so the checks that follow are the
    named form's own.
    """
    rest = call.args[2:]
    if len(call.args) < 3 or any(a.name is not None for a in call.args):
        return None
    key = rest[0].literal
    options = {s.lower(): s for s in signature[2:]}
    if not isinstance(key, str) or key.lower() not in options:
        return None
    if len(rest) % 2:
        raise argument_error("AI_QUERY_WRONG_ARGUMENTS", 
            f"{call.name}: the key/value options after the request come in pairs ('returnType', 'STRING', 'failOnError', false), "
            f"but {rest[-1].text} has no value; give a value after it or use named arguments (returnType => 'STRING')"
        )
    named = list(call.args[:2])
    for k, v in zip(rest[0::2], rest[1::2]):
        option = k.literal
        if not isinstance(option, str) or option.lower() not in options:
            raise argument_error("AI_QUERY_WRONG_ARGUMENTS", 
                f"{call.name}: {k.text} is not an option name; the key/value form takes "
                f"{', '.join(repr(s) for s in signature[2:])}, each followed by its value"
            )
        named.append(Argument(v.text, options[option.lower()]))
    return named


def rewrite_legacy_calls(sql: str, names: set[str], signature: list[str]) -> str:
    """``sql`` with every legacy key/value call of ``names`` written with named arguments (the
    argument texts untouched, in their order, so ``?`` markers keep their places)."""
    while True:
        calls = find_calls(sql, names)
        legacy = {c.start: args for c in calls if (args := legacy_named(c, signature)) is not None}
        if not legacy:
            return sql
        chosen: dict[int, str] = {}
        taken_until = -1
        for call in sorted(calls, key=lambda c: c.start):
            if call.start in legacy and call.start >= taken_until:  # outermost first; nested ones on the next pass
                args = legacy[call.start]
                chosen[call.start] = f"{call.name}(" + ", ".join(a.text if a.name is None else f"{a.name} => {a.text}" for a in args) + ")"
                taken_until = call.end
        sql = replace_calls(sql, chosen, calls)
