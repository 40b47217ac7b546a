"""Gettext catalogs as pairs (English msgid, translated msgstr): .po files parsed, compiled .mo
files unpacked; fuzzy, obsolete, untranslated and placeholder-only entries are skipped and counted."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

from pipeline.core.common import PipelineError
from pipeline.data.sources.text import decode_text

# A gettext entry is placeholder-only when nothing but placeholders, markup, digits, punctuation
# and spaces is left after removing these: %s %(name)s {0} {name} <b> &amp;
PLACEHOLDER = re.compile(r"%(\([^)]*\))?[-#0 +]*\d*(\.\d+)?[sdifFeEgGxXocr%]|\{[^{}]*\}|<[^<>]*>|&#?\w+;")
# The first 4 bytes of a compiled .mo catalog, by the byte order of its numbers
MO_MAGIC = {b"\xde\x12\x04\x95": "<", b"\x95\x04\x12\xde": ">"}
PO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def gettext_pair(msgid: str, msgstr: str, origin: str, stats: Counter) -> dict | None:
    """The (English msgid, translated msgstr) pair, or None (counted) for untranslated or placeholder-only."""
    if not msgid:
        return None  # the header
    if not msgstr.strip():
        stats["gettext_untranslated"] += 1
        return None
    if not any(c.isalpha() for c in PLACEHOLDER.sub("", msgid)):
        stats["gettext_placeholder_only"] += 1
        return None
    return {"src": msgid, "tgt": msgstr, "origin": origin}


def po_entries(text: str, origin: str) -> Iterator[dict]:
    """The entries of a .po catalog as dicts: msgctxt, msgid, msgid_plural, msgstr or msgstr[N],
    plus "flags" (from "#,") and "obsolete" (from "#~")."""

    def unquote(line: str, lineno: int) -> str:
        line = line.strip()
        if len(line) < 2 or line[0] != '"' or line[-1] != '"':
            raise PipelineError(f"{origin}:{lineno}: expected a quoted string, got {line[:60]!r}")
        return re.sub(r"\\(.)", lambda m: PO_ESCAPES.get(m.group(1), m.group(1)), line[1:-1])

    entry: dict = {}
    key = None
    for lineno, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        stripped = line.strip()
        if stripped.startswith("#~"):
            entry["obsolete"] = True
        elif stripped.startswith("#,"):
            entry.setdefault("flags", set()).update(f.strip() for f in stripped[2:].split(","))
        elif not stripped or stripped.startswith("#"):
            if not stripped and ("msgid" in entry or entry.get("obsolete")):
                yield entry
                entry, key = {}, None
        elif stripped.startswith('"'):
            if key is None:
                raise PipelineError(f"{origin}:{lineno}: a continued string outside an entry")
            entry[key] += unquote(stripped, lineno)
        else:
            word, _, rest = stripped.partition(" ")
            if word not in ("msgctxt", "msgid", "msgid_plural", "msgstr") and not re.fullmatch(r"msgstr\[\d+\]", word):
                raise PipelineError(f"{origin}:{lineno}: unexpected {word!r} in a gettext catalog")
            if word in ("msgctxt", "msgid") and any(k.startswith("msgstr") for k in entry):
                yield entry  # a new entry without a blank line before it
                entry = {}
            key = word
            entry[key] = unquote(rest, lineno)
    if entry:
        yield entry


def records_from_po(text: str, origin: str, stats: Counter) -> Iterator[dict]:
    """Pairs from a .po catalog, skipping fuzzy, obsolete (#~), untranslated and placeholder-only entries."""
    for entry in po_entries(text, origin):
        if entry.get("obsolete"):
            stats["gettext_obsolete"] += 1
        elif "msgid" not in entry:
            continue
        elif entry["msgid"] and "fuzzy" in entry.get("flags", ()):
            stats["gettext_fuzzy"] += 1
        else:  # plural entries: the singular msgid with the first form
            rec = gettext_pair(entry["msgid"], entry.get("msgstr", entry.get("msgstr[0]", "")), origin, stats)
            if rec:
                yield rec


def records_from_mo(data: bytes, origin: str, stats: Counter) -> Iterator[dict]:
    """Pairs from a compiled .mo catalog (which holds no fuzzy or obsolete entries)."""
    import struct

    order = MO_MAGIC.get(data[:4])
    if order is None or len(data) < 20:
        raise PipelineError(f"{origin}: not a gettext .mo file (bad magic number)")
    try:
        _, count, originals, translations = struct.unpack(order + "4I", data[4:20])
        for i in range(count):
            olen, ooff = struct.unpack(order + "2I", data[originals + 8 * i : originals + 8 * i + 8])
            tlen, toff = struct.unpack(order + "2I", data[translations + 8 * i : translations + 8 * i + 8])
            if ooff + olen > len(data) or toff + tlen > len(data):
                raise struct.error("string outside the file")
            msgid = data[ooff : ooff + olen].decode("utf-8", errors="replace")
            msgstr = data[toff : toff + tlen].decode("utf-8", errors="replace")
            msgid = msgid.split("\x04")[-1].split("\x00")[0]  # drop the context, keep the singular
            rec = gettext_pair(msgid, msgstr.split("\x00")[0], origin, stats)
            if rec:
                yield rec
    except struct.error as e:
        raise PipelineError(f"{origin}: truncated or corrupt .mo file ({e})") from None


def records_from_catalog(data: bytes, origin: str, stats: Counter) -> Iterator[dict]:
    """Pairs from a gettext catalog: a compiled .mo file (known by its magic number) or a .po file."""
    if data[:4] in MO_MAGIC:
        yield from records_from_mo(data, origin, stats)
    else:
        yield from records_from_po(decode_text(data, origin, stats), origin, stats)
