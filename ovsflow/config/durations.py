"""Go-style durations (`500ms`, `5s`, `1m30s`), as Antrea's configuration spells them."""

from __future__ import annotations

import re

from ..protocol_list import quote_value


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                   "m": 60.0, "h": 3600.0}
# One way to match each part, so that a failing match costs time linear in its length.
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", re.ASCII)
MAX_DURATION = (2**63 - 1) / 1e9  # seconds: Go's longest time.Duration, about 292 years


def parse_duration(value: object) -> float:
    """A Go duration string (`500ms`, `5s`, `1m30s`) in seconds; must be positive."""
    if isinstance(value, bool) or not isinstance(value, str):
        hint = " (add a unit, e.g. '5s')" if isinstance(value, (int, float)) else ""
        raise ValueError(f"expected a duration such as '500ms', '5s' or '1m30s', got "
                         f"{quote_value(value)}{hint}")
    text = value.strip()
    pos, total = 0, 0.0
    while pos < len(text) and (match := _DURATION_PART.match(text, pos)):
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"invalid duration {quote_value(value)}: use Go-style durations such as "
                         "'500ms', '5s' or '1m30s'")
    if total <= 0:
        raise ValueError(f"duration {quote_value(value)} must be greater than zero")
    if not total <= MAX_DURATION:  # also inf, from a few hundred digits
        raise ValueError(f"duration {quote_value(value)} is longer than Go's longest, "
                         f"{format_duration(MAX_DURATION)}")
    return total


def duration_or_zero(value: object) -> float:
    """A duration, or zero (`"0s"`, `"0"`: none)."""
    if isinstance(value, str) and _ZERO_DURATION.fullmatch(value.strip()):
        return 0.0
    return parse_duration(value)


_ZERO_DURATION = re.compile(r"0+(\.0*)?(ns|us|µs|μs|ms|s|m|h)?", re.ASCII)


def format_duration(seconds: float) -> str:
    """The Go-style spelling of a duration, as Go's time.Duration.String() would print it
    for the values people configure."""
    if seconds < 1:
        return f"{round(seconds * 1000, 6):g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{int(hours)}h" if hours else ""
    if hours or minutes:
        text += f"{int(minutes)}m"
    return text + f"{round(secs, 6):g}s"
