"""The web's filters for documents (as C4's and FineWeb's): a URL blocklist, lines of JavaScript
warnings and of cookie and policy notices removed, lorem ipsum, and the share of lines that end
in terminal punctuation. Each looks at one document alone, so the clean stage's workers apply them.

A blocklist file (clean.url_blocklist) has one entry a line; from `#` to the end of a line is a
comment, blank lines are ignored. An entry without `*` is a domain: it matches that host and every
host under it (`example.com` matches www.example.com, `onion` every .onion host). An entry with `*`
is a glob over the whole URL, case-insensitive (fnmatch: `*` crosses `/` too), e.g. `*://*porn*`.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.core.common import PipelineError

DOMAIN = re.compile(r"^[\w-]+(?:\.[\w-]+)*$")
# Lines removed (C4): those that mention javascript ("enable JavaScript to view this page"), and
# cookie and policy notices (FineWeb's C4 filter's substrings); checked in lower case.
LINE_KINDS = ("javascript", "cookie")  # what remove_lines counts
JAVASCRIPT = "javascript"
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# Terminal punctuation in any script: Latin, Cyrillic and Greek . ! ? …, the CJK full stops and
# the full-width forms, the Devanagari danda, Arabic, Armenian, Ethiopic and Myanmar stops; then
# any closing quotes or brackets (". or .» or 。」).
TERMINAL = (
    ".!?\u2026\u203c\u2047\u2048\u2049\u3002\uff01\uff1f\uff61\uff0e\u0964\u0965\u061f\u06d4\u0589\u1362\u1367\u104b"
)
CLOSING = "\"')]}\u00bb\u203a\u201d\u2019\u201c\u300d\u300f\u3011\u3015\u3017\u3019\u301b\u3009\u300b\uff09\uff3d\uff5d\uff02\uff07"
_PUNCTUATED = re.compile(f"[{re.escape(TERMINAL)}][{re.escape(CLOSING)}]*$")
_MANY_NEWLINES = re.compile(r"\n{3,}")


class Blocklist:
    """The domains and URL globs of a blocklist file; blocks(url) says whether a URL matches one."""

    def __init__(self, domains: frozenset[str], globs: list[str]):
        self.domains = domains
        self.globs = globs
        self._globs = re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None

    @classmethod
    def read(cls, path: str) -> Blocklist:
        """The blocklist in file `path` (a one-line error if it cannot be read or an entry is neither
        a domain nor a glob)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise PipelineError(f"clean.url_blocklist: {path}: cannot be read ({reason})") from None
        domains, globs = set(), []
        for i, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip().lower()
            if not entry:
                continue
            if "*" in entry:
                globs.append(entry)
            elif DOMAIN.match(entry.strip(".")):
                domains.add(entry.strip("."))
            else:
                raise PipelineError(
                    f"clean.url_blocklist: {path}:{i}: {entry!r} is neither a domain (example.com) "
                    "nor a URL glob with * (*://*.example.com/*)"
                )
        return cls(frozenset(domains), globs)

    def blocks(self, url: str) -> bool:
        """Whether `url`'s host is a listed domain or under one, or the URL matches a listed glob."""
        if self.domains:
            try:
                host = urlsplit(url if "//" in url else "//" + url).hostname or ""
            except ValueError:  # a malformed URL (an unclosed [IPv6 address): its globs only
                host = ""
            labels = host.rstrip(".").split(".")
            if any(".".join(labels[k:]) in self.domains for k in range(len(labels))):
                return True
        return self._globs is not None and self._globs.match(url.lower()) is not None


def remove_lines(text: str, javascript: bool, cookie: bool, removed: Counter) -> str:
    """`text` without its lines that mention javascript and/or cookie and policy notices (counted
    in `removed` as "javascript" and "cookie"; a line that is both counts as javascript)."""
    kept = []
    for line in text.split("\n"):
        lower = line.lower()
        if javascript and JAVASCRIPT in lower:
            removed["javascript"] += 1
        elif cookie and any(p in lower for p in POLICY):
            removed["cookie"] += 1
        else:
            kept.append(line)
    if len(kept) == text.count("\n") + 1:
        return text
    out = "\n".join(kept)
    return (_MANY_NEWLINES.sub("\n\n", out) if "\n\n\n" in out else out).strip()


def has_lorem_ipsum(text: str) -> bool:
    """Whether `text` holds placeholder text ("Lorem ipsum dolor sit amet...")."""
    return "lorem ipsum" in text.lower()


def punctuated_share(text: str) -> float:
    """The share of `text`'s non-empty lines that end in terminal punctuation (1.0 with none)."""
    lines = [line.rstrip() for line in text.split("\n") if not line.isspace() and line]
    if not lines:
        return 1.0
    return sum(_PUNCTUATED.search(line) is not None for line in lines) / len(lines)
