"""The docs ship with the code: every config key is documented, no link is dead.

Keys are read from the raw Structs in gateway/config.py that the loader decodes
`routes.toml` with (`forbid_unknown_fields=True`): exactly the keys a user may
write. A key added there without a line in docs/configuration.md fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from gateway.core import config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"

# Inline links `[text](target)`; images `![alt](target)` match too.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
_EXTERNAL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto:


def _raw_structs() -> list[type[msgspec.Struct]]:
    """Every raw (as-written) table Struct of the loader."""
    found: list[type[msgspec.Struct]] = []
    for value in vars(config).values():
        if isinstance(value, type) and issubclass(value, config._Raw) and value is not config._Raw:
            found.append(value)
    return found


def accepted_keys() -> set[str]:
    keys = set(config._TOP_LEVEL)
    for struct in _raw_structs():
        keys.update(field.name for field in msgspec.structs.fields(struct))
    return keys


def test_the_loader_has_raw_tables_to_read_keys_from() -> None:
    # Guards the test itself: a refactor that renames _Raw must not make the
    # key check below pass vacuously.
    assert len(_raw_structs()) >= 8
    assert {"listen", "targets", "path_regex", "burst", "allow_origins"} <= accepted_keys()


@pytest.mark.parametrize("key", sorted(accepted_keys()))
def test_every_config_key_is_in_configuration_md(key: str) -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    # Written as code: `key`, or inside a table header such as [upstreams.NAME.health].
    assert f"`{key}`" in text or re.search(rf"[\[.]{re.escape(key)}[\].]", text), (
        f"routes.toml key {key!r} is accepted by gateway/config.py "
        "but not documented in docs/configuration.md"
    )


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _relative_links(path: Path) -> list[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    targets = []
    for match in _LINK.finditer(text):
        target = match.group(1)
        if target.startswith("#") or _EXTERNAL.match(target):
            continue
        targets.append(target)
    return targets


def test_the_docs_exist_and_link_somewhere() -> None:
    names = {path.name for path in DOCS.glob("*.md")}
    assert {
        "index.md",
        "configuration.md",
        "wire.md",
        "admin.md",
        "metrics.md",
        "operations.md",
        "first-route.md",
        "architecture.md",
        "performance.md",
    } <= names
    assert _relative_links(ROOT / "README.md"), "README.md links to no doc at all"


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_resolves_to_a_file(path: Path) -> None:
    dead = []
    for target in _relative_links(path):
        file_part = target.split("#", 1)[0]
        if not file_part:
            continue
        resolved = (path.parent / file_part).resolve()
        if not resolved.is_file():
            dead.append(target)
    assert not dead, f"{path.relative_to(ROOT)} links to missing files: {dead}"


def test_no_doc_points_at_a_contract_users_do_not_have() -> None:
    for path in _markdown_files():
        text = path.read_text(encoding="utf-8")
        assert "shared docs" not in text, path.name
        assert "CONTRACT.md" not in text, path.name
