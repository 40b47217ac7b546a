"""Language identification for clean (clean.language_id): py3langid's naive Bayes model over byte
n-grams, which ships inside the package (nothing is downloaded). The model is loaded once per
process, on first use: a clean without language_id imports nothing of py3langid.

A document is identified on its normalised text, of which at most the first MAX_BYTES of UTF-8
count, so a long document costs bounded time; its score is the model's probability for the
language it names, rounded to 4 decimals so the output is the same on every run and machine.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.common import PipelineError

MAX_BYTES = 20_000
_IDENTIFIER: list = []  # the loaded LanguageIdentifier, once loaded


def identifier() -> Any:
    """py3langid's LanguageIdentifier (probabilities normalised), loaded on the first call."""
    if not _IDENTIFIER:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise PipelineError('clean.language_id needs py3langid: pip install -e ".[web]"') from None
        _IDENTIFIER.append(LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True))
    return _IDENTIFIER[0]


def identify(text: str) -> tuple[str, float]:
    """The language of `text` (an ISO 639 code, as the model names it) and its probability."""
    if len(text) > MAX_BYTES // 4:  # may be longer than MAX_BYTES in UTF-8: cut at a character's end
        text = text.encode("utf-8", "surrogatepass")[:MAX_BYTES].decode("utf-8", "ignore")
    code, score = identifier().classify(text)
    return code, round(score, 4)


def check_codes(sources: list[dict]) -> None:
    """Each language a manifest source names must be one the model knows (e.g. en, ru, zh, ja)."""
    known = set(identifier().labels)
    for src in sources:
        for code in src.get("languages") or ():
            if code not in known:
                raise PipelineError(
                    f"clean: source '{src['name']}': languages: '{code}' is not a language the identifier "
                    f"(py3langid, {len(known)} languages, ISO 639-1 codes such as en, ru, zh, ja) knows; "
                    "name one of its codes or turn clean.language_id off"
                )
