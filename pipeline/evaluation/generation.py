"""Generation: text sampled from fixed prompts, and its diversity beside real held-out text's."""

from __future__ import annotations

from pipeline.core import params as P
from pipeline.data.tokenizer import Tokenizer
from pipeline.decoding.decode import Decoding, compiles, generate
from pipeline.evaluation.scoring import text_statistics, units


def sample_prompts(
    model, tok: Tokenizer, e: P.Evaluate, device: str, val: list[dict]
) -> tuple[list[tuple[str, str]], dict]:
    """Sample `samples_per_prompt` continuations of each prompt; their statistics beside real text's."""
    if not e.prompts:
        return [], {}
    prompts, labels = [], []
    for text, ids in zip(e.prompts, tok.encode(e.prompts)):
        p = [tok.eos_id, *ids]
        prompts += [p] * e.samples_per_prompt  # generate() keeps the end of an over-long prompt
        labels += [text] * e.samples_per_prompt
    decoding = Decoding(e.sample_tokens, **e.sampling())
    out = generate(
        model, prompts, tok.eos_id, decoding, e.decode_batch_size, device, compile=compiles(e.compile, device)
    )
    samples = [(label, tok.decode(o)) for label, o in zip(labels, out)]
    texts = [s for _, s in samples]
    # Real held-out text of the same lengths: the start of val documents (text ones first).
    docs = [r["text"] for r in val if "text" in r] or [r["tgt"] for r in val if "tgt" in r]
    reference = (
        [" ".join(units(docs[i % len(docs)])[: max(len(units(t)), 1)]) for i, t in enumerate(texts)] if docs else []
    )
    return samples, {"model": text_statistics(texts), "held_out_text": text_statistics(reference)}
