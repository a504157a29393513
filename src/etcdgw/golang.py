"""Go's text forms the gateway must match: time.ParseDuration, Duration.String and %q.

Pure functions, no I/O: the config schema, the CLI and the logs use them to read and write
durations and quoted values exactly as the Go gateway does.
"""

from __future__ import annotations

import re

# Go's time.Duration is an int64 of nanoseconds: ParseDuration refuses anything longer.
MAX_DURATION = (2**63 - 1) / 1e9

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # noqa: RUF001 - Go accepts both micro signs
    "μs": 1e-6,  # noqa: RUF001
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUMBER = re.compile(r"[0-9]+\.?[0-9]*|\.[0-9]+")
_UNIT = re.compile(r"[^0-9.]*")


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration, in seconds: "1m0s", "1.5s", "300ms", "1h2m", "0".

    Raises:
        ValueError: with Go's message, e.g. `time: missing unit in duration "123"`.
    """
    quoted = go_quote(text)
    sign = 1.0
    if text[:1] in ("+", "-"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if text == "":
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    pos = 0
    while pos < len(text):
        num = _NUMBER.match(text, pos)
        if num is None:
            raise ValueError(f"time: invalid duration {quoted}")
        unit = _UNIT.match(text, num.end())
        assert unit is not None
        name = unit.group()
        if not name:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if name not in _UNITS:
            raise ValueError(f"time: unknown unit {go_quote(name)} in duration {quoted}")
        total += float(num.group()) * _UNITS[name]
        pos = unit.end()
    if total > MAX_DURATION:
        raise ValueError(f"time: invalid duration {quoted}")
    return sign * total


def format_duration(seconds: float) -> str:
    """Go's Duration.String() for the values we log: 60 -> "1m0s", 1.5 -> "1.5s"."""
    if seconds == 0:
        return "0s"
    neg = seconds < 0
    s = abs(seconds)
    if s < 1:
        ms = s * 1000
        out = f"{ms:g}ms" if ms >= 1 else f"{s * 1e6:g}µs"
    else:
        h, rem = divmod(s, 3600)
        m, sec = divmod(rem, 60)
        sec_text = f"{round(sec, 9):g}s"
        if h:
            out = f"{int(h)}h{int(m)}m{sec_text}"
        elif m:
            out = f"{int(m)}m{sec_text}"
        else:
            out = sec_text
    return "-" + out if neg else out


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_GO_ESCAPES["\v"] = "\\v"


def go_quote(s: str) -> str:
    """Go's %q (strconv.Quote): double quotes, backslash escapes, and every non-printable
    character escaped, so a quoted value is always one line."""
    out = []
    for c in s:
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        elif c in _GO_ESCAPES:
            out.append(_GO_ESCAPES[c])
        elif ord(c) < 0x80:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'
