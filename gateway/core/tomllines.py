"""Where each key of a TOML document is written: key path -> 1-based line.

`tomllib` returns values without positions, and the well-kept alternatives
(tomlkit) keep formatting but expose no line numbers either, so `gateway
check` finds lines itself with this small scanner. It runs only on text that
`tomllib` has already accepted, so it can read the grammar (TOML 1.0) without
reporting syntax errors; should it meet something it does not expect, it stops
and returns what it found so far: a missing line number is acceptable, a wrong
one is not.

Paths are tuples of keys (str) and array positions (int), the same shape as
the decoded document: `[[routes]]` twice then `upstream = ...` gives
`("routes", 1, "upstream")`; an element of `targets = [...]` gives
`("upstreams", "users", "targets", 1)`. The first line that mentions a path
wins, so a table created implicitly by `[a.b.c]` is placed on that header.
"""

from __future__ import annotations

import bisect
import contextlib
import re
import tomllib
from typing import Final

Path = tuple[str | int, ...]

_BARE: Final = re.compile(r"[A-Za-z0-9_-]+")
_SPACE: Final = " \t"
_SCALAR_END: Final = frozenset(",]}#\r\n")


class _Stop(Exception):
    """Something this scanner does not understand: keep what was found."""


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.newlines = [i for i, char in enumerate(text) if char == "\n"]
        self.lines: dict[Path, int] = {}
        # Arrays of tables seen so far and how many elements each has.
        self.aot: dict[Path, int] = {}

    # -- positions -------------------------------------------------------------

    def record(self, path: Path, pos: int) -> None:
        line = bisect.bisect_left(self.newlines, pos) + 1
        for end in range(1, len(path) + 1):
            self.lines.setdefault(path[:end], line)

    def peek(self, offset: int = 0) -> str:
        at = self.pos + offset
        return self.text[at] if at < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _Stop
        self.pos += 1

    def skip_space(self) -> None:
        while self.peek() and self.peek() in _SPACE:
            self.pos += 1

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.text.find("\n", self.pos)
            self.pos = len(self.text) if end < 0 else end

    def skip_blank(self) -> None:
        """Whitespace, newlines and comments, as allowed inside arrays."""
        while True:
            self.skip_space()
            self.skip_comment()
            if self.peek() in ("\n", "\r"):
                self.pos += 1
            else:
                return

    # -- keys ------------------------------------------------------------------

    def simple_key(self) -> str:
        char = self.peek()
        if char in ('"', "'"):
            start = self.pos
            self.string()
            # A quoted key may hold escapes; let tomllib decode it exactly.
            decoded = tomllib.loads(self.text[start : self.pos] + " = 0")
            return next(iter(decoded))
        match = _BARE.match(self.text, self.pos)
        if match is None:
            raise _Stop
        self.pos = match.end()
        return match.group()

    def key(self) -> tuple[str, ...]:
        parts = [self.simple_key()]
        while True:
            self.skip_space()
            if self.peek() != ".":
                return tuple(parts)
            self.pos += 1
            self.skip_space()
            parts.append(self.simple_key())

    # -- values ----------------------------------------------------------------

    def string(self) -> None:
        quote = self.peek()
        if self.text.startswith(quote * 3, self.pos):
            self.pos += 3
            while True:
                end = self.text.find(quote * 3, self.pos)
                if end < 0:
                    raise _Stop
                if quote == '"' and _escaped(self.text, end):
                    self.pos = end + 1
                    continue
                self.pos = end + 3
                # Up to two more quotes belong to the content ("""a"""" is 'a"').
                for _ in range(2):
                    if self.peek() == quote:
                        self.pos += 1
                return
        self.pos += 1
        while True:
            char = self.peek()
            if char in ("", "\n"):
                raise _Stop
            self.pos += 1
            if char == quote:
                return
            if char == "\\" and quote == '"':
                self.pos += 1

    def value(self, path: Path) -> None:
        self.record(path, self.pos)
        char = self.peek()
        if char in ('"', "'"):
            self.string()
        elif char == "[":
            self.pos += 1
            index = 0
            while True:
                self.skip_blank()
                if self.peek() == "]":
                    self.pos += 1
                    return
                self.value((*path, index))
                index += 1
                self.skip_blank()
                if self.peek() == ",":
                    self.pos += 1
        elif char == "{":
            self.pos += 1
            while True:
                self.skip_space()
                if self.peek() == "}":
                    self.pos += 1
                    return
                self.keyval(path)
                self.skip_space()
                if self.peek() == ",":
                    self.pos += 1
        else:
            start = self.pos
            while self.peek() and self.peek() not in _SCALAR_END:
                self.pos += 1
            if self.pos == start:
                raise _Stop

    def keyval(self, table: Path) -> None:
        start = self.pos
        path = (*table, *self.key())
        self.record(path, start)
        self.skip_space()
        self.expect("=")
        self.skip_space()
        self.value(path)

    # -- tables ----------------------------------------------------------------

    def resolve(self, parts: tuple[str, ...]) -> Path:
        """A header's dotted key, each array of tables replaced by its last element."""
        path: Path = ()
        for part in parts:
            path = (*path, part)
            if path in self.aot:
                path = (*path, self.aot[path] - 1)
        return path

    def header(self) -> Path:
        start = self.pos
        array = self.text.startswith("[[", self.pos)
        self.pos += 2 if array else 1
        self.skip_space()
        parts = self.key()
        self.expect("]")
        if array:
            self.expect("]")
            base = (*self.resolve(parts[:-1]), parts[-1])
            count = self.aot.get(base, 0)
            self.aot[base] = count + 1
            table: Path = (*base, count)
        else:
            table = self.resolve(parts)
        self.record(table, start)
        return table

    def document(self) -> None:
        table: Path = ()
        while self.pos < len(self.text):
            self.skip_blank()
            if not self.peek():
                return
            if self.peek() == "[":
                table = self.header()
            else:
                self.keyval(table)


def _escaped(text: str, at: int) -> bool:
    """Whether the quote at `at` follows an odd run of backslashes."""
    count = 0
    while at - count - 1 >= 0 and text[at - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def key_lines(text: str) -> dict[Path, int]:
    """Every key path of `text` (already accepted by tomllib) and the line it starts on."""
    scanner = _Scanner(text)
    # Best effort: the lines found before a surprise are still right.
    with contextlib.suppress(_Stop, tomllib.TOMLDecodeError):
        scanner.document()
    return scanner.lines


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of `path`, or of its nearest enclosing key that has one."""
    for end in range(len(path), 0, -1):
        if (line := lines.get(path[:end])) is not None:
            return line
    return None
