"""ovs-vswitchd's unixctl replies without I/O: one JSON-RPC reply decoded as its bytes
arrive, its "result" text handed on in pieces of whole lines (`ReplyDecoder`). The socket is
`ovs.unixctl_text`'s."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from json.decoder import scanstring

_JSON_SPACE = " \t\n\r"
_NEWLINE_ESCAPE = "\\n"
_JSON_VALUE = json.JSONDecoder().raw_decode


class UnixctlError(RuntimeError):
    pass


class ReplyDecoder:
    """One JSON-RPC reply of ovs-vswitchd's unixctl, decoded as its bytes arrive (sans-IO):
    `feed` returns the text of its "result" in pieces that end on whole lines, so that a
    reply of tens of MB (a 100k-entry dump) is never held whole, as bytes or as text.

    The reply is an object whose members come in any order: "result" (a string, or null),
    "error" (null, or what went wrong) and "id". The result string is decoded up to its last
    `\\n` escape so far (a cut there splits no escape sequence, no surrogate pair and no
    line); the other members are small and decoded whole. A non-null "error", and anything
    that is not such a reply, raise UnixctlError as soon as they arrive."""

    def __init__(self, method: str):
        self.method = method
        self.complete = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._text = ""  # arrived and not yet decoded
        self._step: Callable[[int, list[str]], tuple[int, bool]] = self._object_start

    def feed(self, data: bytes) -> list[str]:
        """The result's text that `data` completes, in pieces of whole lines (the last one
        ends where the text does)."""
        try:
            self._text += self._utf8.decode(data)
        except UnicodeDecodeError as err:
            raise self._malformed(f"not UTF-8 ({err})") from None
        pieces: list[str] = []
        position, waiting = 0, False
        while not (self.complete or waiting):
            position, waiting = self._step(position, pieces)
        self._text = self._text[position:]
        return pieces

    # Each step reads from `position` in self._text: (where the next starts, False), or
    # (position, True) where more text is needed first.

    def _object_start(self, position: int, pieces: list[str]) -> tuple[int, bool]:
        found, position = self._next(position, "{")
        if found:
            self._step = self._first_member
        return position, not found

    def _first_member(self, position: int, pieces: list[str]) -> tuple[int, bool]:
        found, after = self._next(position, '"}')
        if found == "}":
            self.complete = True
            return after, False
        return self._member(position, pieces) if found else (position, True)

    def _member(self, position: int, pieces: list[str]) -> tuple[int, bool]:
        """`"key": value`, the whole of it, or the start of the result's text."""
        text = self._text
        found, start = self._next(position, '"')
        close = _closing_quote(text, start) if found else -1
        if close < 0:
            return position, True
        key = self._decoded(text[start:close])
        found, start = self._next(close + 1, ":")
        start = self._next(start, "")[1]
        if not found or start == len(text):
            return position, True
        if key == "result" and text[start] == '"':
            self._step = self._result
            return start + 1, False
        end = _value_end(text, start)
        if end < 0:
            return position, True
        try:
            value, used = _JSON_VALUE(text[start:end])
        except json.JSONDecodeError as err:
            raise self._malformed(f"{key}: {err}") from None
        if used != end - start:
            raise self._malformed(f"{key}: {text[start:end][:30]!r} is not a JSON value")
        if key == "error" and value is not None:
            raise UnixctlError(f"{self.method}: {value}")
        if key == "result" and value is not None:
            raise self._malformed(f"result {value!r:.30} is not text")
        self._step = self._after_member
        return end, False

    def _after_member(self, position: int, pieces: list[str]) -> tuple[int, bool]:
        found, after = self._next(position, ",}")
        if found == "}":
            self.complete = True
        elif found:
            self._step = self._member
        return (after, False) if found else (position, True)

    def _result(self, position: int, pieces: list[str]) -> tuple[int, bool]:
        """The result's text: to its closing quote, or to its last newline so far."""
        text = self._text
        close = _closing_quote(text, position)
        end = close if close >= 0 else _after_last_newline(text, position)
        if end > position:
            pieces.append(self._decoded(text[position:end]))
        if close < 0:
            return end if end > position else position, True
        self._step = self._after_member
        return close + 1, False

    def _next(self, position: int, allowed: str) -> tuple[str, int]:
        """The next character after white space if it is one of `allowed` ('' at the end
        of the text so far), and the position after it."""
        text = self._text
        while position < len(text) and text[position] in _JSON_SPACE:
            position += 1
        if position == len(text) or not allowed:
            return "", position
        if text[position] not in allowed:
            raise self._malformed(f"expected {' or '.join(allowed)} at "
                                  f"{text[position:position + 30]!r}")
        return text[position], position + 1

    def _decoded(self, escaped: str) -> str:
        """A JSON string's text from between its quotes (C-fast: json's own scanner)."""
        try:
            return scanstring(escaped + '"', 0)[0]
        except json.JSONDecodeError as err:
            raise self._malformed(str(err)) from None

    def _malformed(self, what: str) -> UnixctlError:
        return UnixctlError(f"{self.method}: malformed reply from ovs-vswitchd: {what}")


def _closing_quote(text: str, start: int) -> int:
    """Where the JSON string whose text starts at `start` ends (its closing quote), or -1:
    the first quote after an even number of backslashes (an odd number escapes it)."""
    quote = text.find('"', start)
    while quote >= 0:
        backslash = quote
        while backslash > start and text[backslash - 1] == "\\":
            backslash -= 1
        if (quote - backslash) % 2 == 0:
            return quote
        quote = text.find('"', quote + 1)
    return -1


def _after_last_newline(text: str, start: int) -> int:
    """Where the last complete `\\n` escape after `start` ends, or -1."""
    end = len(text)
    while (escape := text.rfind(_NEWLINE_ESCAPE, start, end)) >= 0:
        backslash = escape
        while backslash > start and text[backslash - 1] == "\\":
            backslash -= 1
        if (escape - backslash) % 2 == 0:  # not an escaped backslash and an "n"
            return escape + 2
        end = escape + 1
    return -1


def _value_end(text: str, start: int) -> int:
    """Where the JSON value at `start` ends, or -1 if it has not all arrived: a string at
    its closing quote, an object or array at its closing bracket, anything else before the
    next white space, ',', '}' or ']'."""
    depth, position = 0, start
    while position < len(text):
        character = text[position]
        if character == '"':
            close = _closing_quote(text, position + 1)
            if close < 0:
                return -1
            position = close + 1
            if depth == 0:
                return position
            continue
        if character in "[{":
            depth += 1
        elif character in "]}":
            if depth == 0:
                return position
            depth -= 1
            if depth == 0:
                return position + 1
        elif depth == 0 and (character == "," or character in _JSON_SPACE):
            return position
        position += 1
    return -1
