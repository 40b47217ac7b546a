"""Languages of pair sources: their codes, the target tag a prompt carries, and a check that each
side of a pair is written in its language's script.

A pair source may name its languages (`languages: [en, ru]`, ISO 639 codes, source then target).
Its pairs then carry the target's language, and the tokenizer renders them
`<src> <2ru> source <tgt> target </s>`: the tag tells one model which language to write, as in
multilingual translation systems (Johnson et al., 2017), so several directions share a model.
"""

from __future__ import annotations

import re

from pipeline.core.common import PipelineError

CODE = re.compile(r"^[a-z]{2,3}$")

# The letters of each script (Unicode blocks), and the script each known language is written in.
SCRIPTS = {
    "Latin": "A-Za-z\u00c0-\u024f\u1e00-\u1eff",
    "Cyrillic": "\u0400-\u052f",
    "Greek": "\u0370-\u03ff\u1f00-\u1fff",
    "Arabic": "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff",
    "Hebrew": "\u0590-\u05ff",
    "Devanagari": "\u0900-\u097f",
    "Bengali": "\u0980-\u09ff",
    "Thai": "\u0e00-\u0e7f",
    "Han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
    "Han and kana": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff",
    "Hangul": "\uac00-\ud7af\u1100-\u11ff\u3400-\u4dbf\u4e00-\u9fff",
}
SCRIPT_OF = {
    **dict.fromkeys(
        "en fr de es it pt nl ro pl tr vi tl id ms sw cs sk sl hr bs sq sv da no nb nn fi et lv lt hu "
        "eu ca gl ga cy af is mt eo la az uz".split(),
        "Latin",
    ),
    **dict.fromkeys("ru uk be bg sr mk kk ky mn tg".split(), "Cyrillic"),
    "el": "Greek",
    **dict.fromkeys("ar fa ur ps".split(), "Arabic"),
    **dict.fromkeys("he yi".split(), "Hebrew"),
    **dict.fromkeys("hi mr ne sa".split(), "Devanagari"),
    **dict.fromkeys("bn as".split(), "Bengali"),
    "th": "Thai",
    "zh": "Han",
    "ja": "Han and kana",
    "ko": "Hangul",
}
MIN_SCRIPT_SHARE = 0.25  # of a side's letters, counted in UTF-8 bytes (fair to Han against Latin)
CHECKED_PAIRS = 2000


def tag(code: str) -> str:
    """The control token that asks for text in language `code`."""
    return f"<2{code}>"


def check_code(code: str, key: str) -> None:
    if not CODE.match(code):
        raise PipelineError(f"{key}: {code!r} is not a language code (ISO 639, two or three lower-case letters)")


def script_share(texts: list[str], script: str) -> float:
    """The share of the texts' letters (in UTF-8 bytes) that are written in `script`."""
    sample = "".join(texts)
    letters = sum(len(ch.encode("utf-8")) for ch in sample if ch.isalpha())
    in_script = len("".join(re.findall(f"[{SCRIPTS[script]}]", sample)).encode("utf-8"))
    return in_script / letters if letters else 1.0


def check_sides(pairs: list[dict], languages: list[str], key: str) -> None:
    """A pair source's sides against its declared languages: each side must be written, at least
    in part, in its language's script (a swapped pair of columns fails here). Languages whose
    script this module does not know are not checked."""
    for side, code in zip(("src", "tgt"), languages):
        script = SCRIPT_OF.get(code)
        if script is None or not pairs:
            continue
        share = script_share([p[side] for p in pairs[:CHECKED_PAIRS]], script)
        if share < MIN_SCRIPT_SHARE:
            raise PipelineError(
                f"{key}: '{code}' for the {'source' if side == 'src' else 'target'} side, but only "
                f"{share:.0%} of its letters are {script} script (is this language not in the source, "
                "or are the source and target sides swapped?)"
            )
