"""Manifests as YAML text: block style, keys in insertion order, comments above each document.

A string is written plain only when no YAML 1.1 or 1.2 reader (PyYAML, kubectl's sigs.k8s.io/yaml) could take
it for anything else: not a number, date, boolean or null, nothing YAML gives a meaning. Anything else is
double-quoted, with escapes for every character YAML does not print as is. Manifests hold only dicts, lists,
str, int and bool; anything else is refused. Standard library only, so ``zeroserve render`` needs no PyYAML.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_PLAIN = re.compile(r"(--)?[A-Za-z0-9/][A-Za-z0-9_./:=@+-]*")
_NOT_STRINGS = re.compile(
    r"y|yes|n|no|true|false|on|off|null|~"  # booleans and null, YAML 1.1 and 1.2
    # anything number- or date-like: ints (0x, 0o, 0b too), floats, sexagesimal, timestamps
    r"|[-+]?[0-9.][0-9a-fA-FoxXtTzZ_:.+-]*",
    re.IGNORECASE,
)


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise TypeError(f"cannot write {type(value).__name__} as a manifest value")
    if _PLAIN.fullmatch(value) and not _NOT_STRINGS.fullmatch(value) and not value.endswith(":") and value != "=":
        return value
    return _quote(value)


_ESCAPED = {0x2028, 0x2029, 0xFEFF}  # line and paragraph separators are line breaks to YAML; BOM


def _quote(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code <= 0x7E or (0xA0 <= code <= 0xFFFD and code not in _ESCAPED and not 0xD800 <= code <= 0xDFFF):
            out.append(char)
        elif code >= 0x10000:
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def _emit(value: object, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            head = f"{pad}{_scalar(key)}:"
            if isinstance(item, (dict, list)) and item:
                out.append(head)
                _emit(item, indent + 2, out)
            else:
                out.append(f"{head} {_inline(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)) and item:
                nested: list[str] = []
                _emit(item, indent + 2, nested)
                # The first line of the item goes after the dash.
                out.append(f"{pad}- {nested[0][indent + 2 :]}")
                out.extend(nested[1:])
            else:
                out.append(f"{pad}- {_inline(item)}")
    else:
        out.append(f"{pad}{_inline(value)}")


def _inline(value: object) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(manifests: Iterable[Mapping[str, Any]], comments: Sequence[Sequence[str]] = ()) -> str:
    """Manifests as one multi-document YAML text; ``comments[i]`` lines go above document ``i``."""
    docs = []
    for i, manifest in enumerate(manifests):
        lines = [f"# {line}".rstrip() for line in (comments[i] if i < len(comments) else ())]
        if manifest:
            _emit(dict(manifest), 0, lines)
        else:
            lines.append("{}")
        docs.append("\n".join(lines) + "\n")
    return "---\n".join(docs)
