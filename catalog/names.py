"""Names that become one path segment of the catalog: parts, seeds, tables below ``curated/``.

A name lands in paths such as ``curated/<part>/``, ``packed/<part>/``, ``_seeds/<name>/`` and
``_ledger/sample-<part>/``, some of which a stage deletes before it writes. So a name is checked
once, where it enters (config load, a command's argument), never cleaned up later: one segment of
ASCII letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit (``.``, ``..`` and the
hidden ``_*``/``.*`` folders the catalog skips are impossible), at most ``MAX_LENGTH`` characters.
"""

from __future__ import annotations

import re

from catalog.config import ConfigError

MAX_LENGTH = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def check_name(value: object, what: str) -> str:
    """``value`` if it is a safe catalog name, else a ``ConfigError`` saying what ``what`` must look like."""
    if isinstance(value, str) and len(value) <= MAX_LENGTH and _NAME.fullmatch(value):
        return value
    shown = repr(value) if len(repr(value)) <= 2 * MAX_LENGTH else repr(value)[: 2 * MAX_LENGTH] + "…"
    raise ConfigError(
        f"{what}: {shown} is not a valid name; use 1-{MAX_LENGTH} of the characters A-Z a-z 0-9 . _ -, "
        "starting with a letter or digit (a name is one folder of the catalog, never a path)"
    )


def safe_name(text: str, fallback: str) -> str:
    """A valid name made from free text (a folder's base name): unsafe runs become ``_``, cut to fit."""
    cleaned = _UNSAFE.sub("_", text).lstrip("._-")[:MAX_LENGTH]
    return cleaned or fallback
