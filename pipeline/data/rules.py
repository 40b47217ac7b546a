"""The per-document rules of cleaning: normalisation, PII scrubbing, the length and length-ratio
filters, the Gopher/C4 quality rules (QUALITY_REASONS) and the hashed split of a document.

Each rule looks at one document alone, so the workers of the clean stage apply them in any order.
"""

from __future__ import annotations

import functools
import hashlib
import html
import re
import sys
import unicodedata
from collections import Counter

from pipeline.core import params as P

QUALITY_REASONS = (
    "quality_alpha",
    "quality_word_length",
    "quality_repeated_lines",
    "quality_repeated_bigram",
    "quality_symbols",
)

# A digit, in any script but the full-width forms (０-９): Chinese and Japanese text writes
# statistics and dates in full-width digits, which are not phone numbers or addresses.
_D = "[^\\D\uff10-\uff19]"
PII = {  # kind: pattern; replaced by [KIND]
    "email": re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "ip": re.compile(
        rf"(?<![\w.:])(?:(?:25[0-5]|2[0-4]{_D}|1?{_D}?{_D})\.){{3}}(?:25[0-5]|2[0-4]{_D}|1?{_D}?{_D})(?![\w.])"
        r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
    ),
    "phone": re.compile(
        rf"(?<![\w+])(?:\+{_D}{{1,3}}[ .-]?)?(?:\({_D}{{1,4}}\)[ .-]?)?{_D}{{2,4}}(?:[ .-]?{_D}{{2,4}}){{1,4}}(?!\w)"
    ),
}
_DIGIT = re.compile(_D)
# Characters of the CJK scripts (Han, kana, Hangul, their punctuation and the full-width forms):
# one carries about what three Latin letters do, so the pair length ratio counts each as 3 (as
# UTF-8 does), and every other character as 1 (Cyrillic or Greek text, 2 bytes a letter in
# UTF-8, is not counted double).
_CJK = re.compile("[\u1100-\u11ff\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_SPACES = re.compile(r"[^\S\n]+")
_SPACED_NEWLINE = re.compile(r" ?\n ?")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_NOT_LETTERS = re.compile(r"[\W\d_]+")
_NOT_ASCII_LETTERS = bytes(b for b in range(128) if not chr(b).isalpha())


@functools.cache
def _invisible() -> re.Pattern:
    """Cc (control characters: NUL, escapes...) and Cf (invisible format characters: BOM, zero-width),
    except newline and tab. (U+2581 goes too: sentencepiece uses it to stand for a space.)"""
    chars = [
        chr(i)
        for i in range(sys.maxunicode + 1)
        if unicodedata.category(chr(i)) in ("Cc", "Cf") and chr(i) not in "\n\t"
    ]
    return re.compile("[" + "".join(re.escape(ch) for ch in chars) + "]+")


def normalize(text: str, form: str = "NFC", single_line: bool = False) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "&" in text:
        text = html.unescape(text)
    if "<" in text:
        text = _TAG.sub("", text)
    # The common case, checked at C speed: no control, format or unusual space characters.
    plain = text.replace("\n", "").replace("\t", " ").isprintable()
    if not plain:  # removed before composing, so "e", ZWSP, U+0301 still becomes one NFC character
        text = _invisible().sub("", text)
    if "\u2581" in text:
        text = text.replace("\u2581", "")
    if not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
    if single_line:
        text = text.replace("\n", " ")
    if not plain or "\t" in text or "  " in text:
        text = _SPACES.sub(" ", text)
    if " \n" in text or "\n " in text:
        text = _SPACED_NEWLINE.sub("\n", text)
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def scrub_pii(text: str, counts: Counter) -> str:
    """Replace e-mail addresses, IP addresses and phone numbers (9 to 15 digits) with placeholders."""
    if "@" in text:
        text, n = PII["email"].subn("[EMAIL]", text)
        counts["email"] += n
    if text.isascii():  # ten substring searches beat one regex scan
        digits = any(d in text for d in "0123456789")
    else:
        digits = _DIGIT.search(text) is not None
    if digits or text.count(":") >= 7:  # IPv4 has digits, IPv6 seven colons
        text, n = PII["ip"].subn("[IP]", text)
        counts["ip"] += n
    if not digits:
        return text

    def phone(match: re.Match) -> str:
        if not 9 <= len(_DIGIT.findall(match.group())) <= 15:
            return match.group()
        counts["phone"] += 1
        return "[PHONE]"

    return PII["phone"].sub(phone, text)


def weighted_length(text: str) -> int:
    """Characters, a CJK one counting 3: a length fair to both sides of a pair in any scripts."""
    return len(text) if text.isascii() else len(text) + 2 * len(_CJK.findall(text))


def drop_reason(texts: list[str], settings: P.Clean, qa: bool = False) -> str | None:
    """Why a document or pair is dropped (None: kept). A QA pair's answer may be short ("42") and
    much shorter than its question: min_chars and the length ratio apply to neither."""
    if any(not t for t in texts):
        return "empty"
    weighted = [weighted_length(t) for t in texts]
    if (weighted[0] if qa else min(weighted)) < settings.min_chars:  # "打开" (open) is as long as "open"
        return "too_short"
    if max(len(t) for t in texts) > settings.max_chars:
        return "too_long"
    if len(texts) == 2 and not qa and max(weighted) / min(weighted) > settings.max_length_ratio:
        return "length_ratio"
    return None


def quality_reason(text: str, settings: P.Clean) -> str | None:
    """The first Gopher/C4 rule a document breaks (documents of at least quality_min_words words)."""
    words = text.split()
    if len(words) < settings.quality_min_words:
        return None
    non_space = sum(map(len, words))
    if text.isascii():
        letters = len(text.encode("ascii").translate(None, _NOT_ASCII_LETTERS))
    else:
        letters = len(_NOT_LETTERS.sub("", text))  # letters (and non-decimal numerals such as "½")
    if letters < settings.min_alpha_fraction * non_space:
        return "quality_alpha"
    if not settings.min_mean_word_length <= non_space / len(words) <= settings.max_mean_word_length:
        return "quality_word_length"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and (len(lines) - len(set(lines))) / len(lines) > settings.max_duplicate_line_fraction:
        return "quality_repeated_lines"
    ((top, count),) = Counter(zip(words, words[1:])).most_common(1)
    if count > 1 and count * (len(top[0]) + len(top[1])) > settings.max_top_bigram_fraction * non_space:
        return "quality_repeated_bigram"
    if (text.count("#") + text.count("...") + text.count("\u2026")) > settings.max_symbol_word_ratio * len(words):
        return "quality_symbols"
    return None


def split_of(key: str, settings: P.Clean) -> str:
    """Deterministic split from a hash of the normalised key text."""
    digest = hashlib.blake2b(f"{settings.split_salt}\0{key}".encode(), digest_size=8).digest()
    draw = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    if draw < settings.test_fraction:
        return "test"
    if draw < settings.test_fraction + settings.val_fraction:
        return "val"
    return "train"
