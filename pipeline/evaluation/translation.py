"""Translation scored as the field does: each test pair of each pair source (a direction)
translated greedily and by beam search, BLEU, chrF and TER (sacrebleu, with the BLEU tokenizer that
fits the target's script and bootstrap intervals) beside copying the source; the beam's size, length
penalty and repetition penalty chosen per direction by chrF on val pairs."""

from __future__ import annotations

from pipeline.core import params as P
from pipeline.data.tokenizer import Tokenizer
from pipeline.decoding.decode import Decoding, beam_search, compiles, generate, keep_end
from pipeline.evaluation.report import decoding_words
from pipeline.evaluation.scoring import bleu_tokenizer, corpus_scores

SHOWN_TRANSLATIONS = 8


def translation_tokens(model, max_new_tokens: int) -> int:
    """The most tokens a translation may have: max_new_tokens, within a GPT's context less a little
    room for the source."""
    return min(max_new_tokens, model.block_size - 4) if model.bounded_context else max_new_tokens


def translation_prompts(model, tok: Tokenizer, pairs: list[dict], new_tokens: int) -> list[list[int]]:
    """Each pair's prompt `</s> <src> <2xx> source <tgt>`, a source too long for the context cut
    from the left so that `new_tokens` of target still fit."""
    sources = tok.encode([r["src"] for r in pairs])
    return [keep_end(model, tok.pair_prompt(ids, r.get("tgt_lang")), new_tokens) for ids, r in zip(sources, pairs)]


def pairs_by_source(records: list[dict]) -> dict[str, list[dict]]:
    """The translation pairs (not QA pairs) of each source."""
    by_source: dict[str, list[dict]] = {}
    for r in records:
        if "src" in r and "task" not in r:
            by_source.setdefault(r["source"], []).append(r)
    return by_source


def translate_test_pairs(
    model, tok: Tokenizer, e: P.Evaluate, device: str, test: list[dict], val: list[dict]
) -> tuple[dict | None, list[dict]]:
    """Translate the test pairs of each pair source (a direction), score them against the references
    with the BLEU tokenizer that fits the target's script, beside copying the source. The beam's
    size and length penalty are chosen per direction by chrF on the first `tune_pairs` val pairs."""
    by_source = pairs_by_source(test)
    if not by_source:
        return None, []
    val_pairs = pairs_by_source(val) if e.tune_pairs else {}
    new_tokens = translation_tokens(model, e.max_new_tokens)

    def translate(pairs: list[dict], decoding: Decoding, label: str, length_penalties=None):
        """The translations; with length_penalties (a beam), {length penalty: translations}."""
        prompts = translation_prompts(model, tok, pairs, new_tokens)
        run = (e.decode_batch_size, device, label, compiles(e.compile, device))
        if length_penalties is None or decoding.beam_size == 1:
            texts = [tok.decode(o).strip() for o in generate(model, prompts, tok.eos_id, decoding, *run)]
            return texts if length_penalties is None else dict.fromkeys(length_penalties, texts)
        ranked = beam_search(model, prompts, tok.eos_id, decoding, length_penalties, *run)
        return {lp: [tok.decode(o).strip() for o in out] for lp, out in ranked.items()}

    result: dict = {
        "beam_size": e.beam_size,
        "bootstrap_samples": e.bootstrap,
        "max_target_ratio": e.max_target_ratio,
        "directions": {},
    }
    shown = []
    for source, pairs in by_source.items():
        pairs = pairs[: e.max_pairs] if e.max_pairs else pairs
        refs = [r["tgt"] for r in pairs]
        tokenize = bleu_tokenizer(refs)
        direction: dict = {"pairs": len(pairs), "bleu_tokenize": tokenize}
        if pairs[0].get("tgt_lang"):
            direction["target_language"] = pairs[0]["tgt_lang"]
        decodings = {"greedy": Decoding(new_tokens, e.max_target_ratio)}
        beam = {"beam_size": e.beam_size, "length_penalty": e.length_penalty, "repetition_penalty": 1.0}
        tune = val_pairs.get(source, [])[: e.tune_pairs] if e.beam_size > 1 else []
        if tune:
            beam, direction["beam_chosen_on_val"] = choose_beam(translate, tune, source, e, new_tokens, tokenize)
        if e.beam_size > 1:
            decodings["beam"] = Decoding(new_tokens, e.max_target_ratio, **beam)
        hyps = {}
        for name, decoding in decodings.items():
            hyps[name] = translate(pairs, decoding, f"translate {source} ({name})")
            direction[name], signatures = corpus_scores(hyps[name], refs, e.bootstrap, tokenize=tokenize)
            if name == "beam":
                direction[name].update(beam)
        direction["copy_source"], _ = corpus_scores([r["src"] for r in pairs], refs, e.bootstrap, tokenize=tokenize)
        direction["signatures"] = signatures
        result["directions"][source] = direction
        shown += [
            {"direction": source, "src": r["src"], "ref": r["tgt"], **{k: h[i] for k, h in hyps.items()}}
            for i, r in enumerate(pairs[:SHOWN_TRANSLATIONS])
        ]
    return result, shown


def choose_beam(
    translate, pairs: list[dict], source: str, e: P.Evaluate, new_tokens: int, tokenize: str
) -> tuple[dict, dict]:
    """The beam size, length penalty and repetition penalty with the best chrF on `pairs` (val),
    over the grid of tune_beam_sizes x tune_length_penalties x tune_repetition_penalties (the
    first best on ties); and every point's chrF, BLEU and length ratio. One beam search serves
    every length penalty (it only ranks the final beams)."""
    refs = [r["tgt"] for r in pairs]
    scored = {}
    for size in e.tune_beam_sizes:
        lengths = e.tune_length_penalties if size > 1 else [1.0]
        for repetition in e.tune_repetition_penalties:
            search = {"beam_size": size, "repetition_penalty": repetition}
            decoding = Decoding(new_tokens, e.max_target_ratio, **search)
            label = f"val {source} ({decoding_words({**search, 'length_penalty': lengths[0]})}...)"
            for length, hyps in translate(pairs, decoding, label, lengths).items():
                scores, _ = corpus_scores(hyps, refs, 0, tokenize=tokenize, metrics=("chrf", "bleu"))
                scored[size, length, repetition] = {k: scores[k] for k in ("chrf", "bleu", "length_ratio")}
    grid = [  # in the grid's order: on a tie, the first best wins
        {
            "beam_size": size,
            "length_penalty": length,
            "repetition_penalty": repetition,
            **scored[size, length, repetition],
        }
        for size in e.tune_beam_sizes
        for length in (e.tune_length_penalties if size > 1 else [1.0])
        for repetition in e.tune_repetition_penalties
    ]
    best = max(grid, key=lambda g: g["chrf"])
    chosen = {k: best[k] for k in ("beam_size", "length_penalty", "repetition_penalty")}
    return chosen, {"pairs": len(pairs), "by": "chrf", "grid": grid}
