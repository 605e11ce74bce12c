"""gateway.tomllines: the line each key of a TOML document starts on."""

from __future__ import annotations

import json
import tomllib

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.core.tomllines import key_lines, line_of

# Control characters and DEL must be escaped in TOML; json.dumps leaves DEL raw.
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=8)
KEYS = st.one_of(st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True), TEXT)
VALUES = st.one_of(
    st.integers(),
    TEXT,
    st.lists(st.integers(), max_size=3),
    st.just('"""\n[[fake]]\nkey = 1\n"""'),  # raw TOML: a multi-line string
)


def _key(key: str) -> str:
    # json.dumps escapes (\", \\, \n) are valid TOML basic-string escapes.
    return (
        key
        if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
        else (json.dumps(key, ensure_ascii=False))
    )


def _value(value: object) -> str:
    if isinstance(value, str) and value.startswith('"""'):
        return value
    return json.dumps(value, ensure_ascii=False)


@given(
    st.dictionaries(KEYS, VALUES, max_size=4),
    st.lists(st.dictionaries(KEYS, VALUES, max_size=3), max_size=3),
    st.integers(min_value=0, max_value=2),
)
@example({"a": '"""\n[[routes]]\nkey = 1\n"""'}, [{"key": 1}], 1)
def test_every_key_is_placed_on_the_line_it_was_written_on(
    top: dict[str, object], routes: list[dict[str, object]], blank: int
) -> None:
    lines: list[str] = []
    expected: dict[tuple[str | int, ...], int] = {}

    def write(path: tuple[str | int, ...], text: str) -> None:
        lines.extend(["# comment", *[""] * blank])
        # a multi-line value spans more than one line of the file
        expected.setdefault(path, sum(item.count("\n") + 1 for item in lines) + 1)
        lines.append(text)

    for key, value in top.items():
        write((key,), f"{_key(key)} = {_value(value)}")
    for index, route in enumerate(routes):
        write(("routes", index), "[[ routes ]]")
        for key, value in route.items():
            write(("routes", index, key), f"{_key(key)}\t=  {_value(value)}  # why")
    text = "\n".join(lines) + "\n"
    if "routes" in top:
        return  # "routes" both as a key and an array of tables: not valid TOML
    tomllib.loads(text)  # the scanner only ever reads documents tomllib accepted
    found = key_lines(text)
    for path, line in expected.items():
        assert found[path] == line, (path, text)


def test_array_elements_and_inline_tables_get_their_own_lines() -> None:
    text = 'targets = [\n  "a",\n\n  { url = "b", weight = 3 },  # x\n]\n'
    found = key_lines(text)
    assert found[("targets",)] == 1
    assert found[("targets", 0)] == 2
    assert (found[("targets", 1)], found[("targets", 1, "weight")]) == (4, 4)


def test_an_unknown_path_falls_back_to_its_nearest_ancestor_or_none() -> None:
    found = key_lines("\n[a]\nb = 1\n")
    assert line_of(found, ("a", "b")) == 3
    assert line_of(found, ("a", "missing", 2)) == 2
    assert line_of(found, ("elsewhere",)) is None
    assert line_of(found, ()) is None


def test_text_it_cannot_read_yields_what_was_found_so_far() -> None:
    # Never raises: a missing line number is acceptable, a wrong one is not.
    assert key_lines("a = 1\n= oops\nb = 2\n") == {("a",): 1}
    assert key_lines('a = "unterminated\n') == {("a",): 1}
    assert key_lines("") == {}
