"""Text generation from a trained checkpoint, on the command line (the decoding itself: pipeline.decoding).

python -m pipeline.generate "ROMEO:"                      # continue text, streamed
python -m pipeline.generate --translate "In the beginning God created the heaven and the earth."
python -m pipeline.generate --translate --beam-size 4 "Jesus wept."
python -m pipeline.generate --ask "Who says: 'To be, or not to be: that is the question:'?"
"""

from __future__ import annotations

import argparse
import sys

import torch

from pipeline.core.common import PipelineError, run_main
from pipeline.core.params import Evaluate
from pipeline.core.paths import BEST_WEIGHTS, TOKENIZER
from pipeline.data.qa import TASK, question_text
from pipeline.data.tokenizer import Tokenizer
from pipeline.decoding.answer import ANSWER_TOKENS, answer, check_question
from pipeline.decoding.decode import Decoding, TextStream, generate, keep_end, stream
from pipeline.model.weights import load_model

SAMPLING = Evaluate()  # the defaults: evaluate's sampling (sample_tokens, temperature, top_k, ...), as the playground's


def target_language(tok: Tokenizer, to: str) -> str | None:
    """--to, checked; or the tokenizer's one target language; None for a model trained without tags."""
    if to:
        tok.language_id(to)
        return to
    if len(tok.languages) > 1:
        raise PipelineError(f"--to: the model translates into {', '.join(sorted(tok.languages))}; choose one")
    return next(iter(tok.languages), None)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_arguments(args)
    decoding = decoding_of(args)
    text = text_of(args)
    tok = Tokenizer(args.tokenizer)
    model = load_model(args.checkpoint, tok, args.tokenizer)
    if args.ask is not None:
        tok.task_id(TASK)  # a model trained without QA pairs cannot answer: say so
        (reply,) = answer(model, tok, [text], decoding, 1, "cpu")
        print(reply)
        return
    prompt = prompt_of(model, tok, text, args)
    if not args.translate:
        print(args.prompt, end="", flush=True)
    if decoding.beam_size > 1:
        (new,) = generate(model, [prompt], tok.eos_id, decoding)
        print(tok.decode(new))
        return
    print_stream(model, tok, prompt, decoding)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.generate", description="Generate text with a trained model.")
    ap.add_argument("prompt", nargs="?", help="text to continue (with --translate: the source sentence)")
    ap.add_argument("--translate", action="store_true", help="render the prompt as a pair source and decode its target")
    ap.add_argument("--ask", metavar="QUESTION", help="answer a question (a model trained on QA pairs), greedily")
    ap.add_argument("--context", default="", metavar="TEXT", help="--ask: the passage the question is about")
    ap.add_argument(
        "--to", default="", metavar="LANG", help="--translate: the target language (default: the model's only one)"
    )
    ap.add_argument("--checkpoint", default=str(BEST_WEIGHTS))
    ap.add_argument("--tokenizer", default=str(TOKENIZER))
    s = SAMPLING
    ap.add_argument(
        "--max-new-tokens", type=int, default=None, help=f"default {s.sample_tokens} ({ANSWER_TOKENS} with --ask)"
    )
    ap.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"0: greedy; default {s.temperature:g}, or 0 with --translate and --ask",
    )
    ap.add_argument("--top-k", type=int, default=s.top_k, help=f"default {s.top_k}")
    ap.add_argument("--top-p", type=float, default=s.top_p, help=f"default {s.top_p:g}")
    ap.add_argument(
        "--repetition-penalty", type=float, default=s.repetition_penalty, help="> 1 discourages tokens already seen"
    )
    ap.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N", help="never write an N-gram twice")
    ap.add_argument("--beam-size", type=int, default=1, help="> 1: beam search (deterministic)")
    ap.add_argument("--length-penalty", type=float, default=1.0, help="beam: rank by log-probability / length ** this")
    ap.add_argument("--seed", type=int, default=s.seed)
    return ap


def check_arguments(args: argparse.Namespace) -> None:
    if args.ask is not None:
        if args.prompt is not None or args.translate:
            raise PipelineError("--ask: give the question alone (no prompt, no --translate)")
        check_question(args.ask)
    elif args.context:
        raise PipelineError("--context: only with --ask")
    elif args.prompt is None:
        raise PipelineError("prompt: missing; give some text to continue (or --ask QUESTION)")


def decoding_of(args: argparse.Namespace) -> Decoding:
    """The decoding the arguments ask for; greedy by default where one answer is wanted."""
    deterministic = args.translate or args.ask is not None
    temperature = args.temperature if args.temperature is not None else (0.0 if deterministic else SAMPLING.temperature)
    max_new_tokens = args.max_new_tokens or (ANSWER_TOKENS if args.ask is not None else SAMPLING.sample_tokens)
    decoding = Decoding(
        max_new_tokens,
        temperature=temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram=args.no_repeat_ngram,
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        seed=args.seed,
    )
    decoding.check()
    return decoding


def text_of(args: argparse.Namespace) -> str:
    """The text to continue or translate, or the question (after its passage)."""
    text = question_text(args.ask, args.context) if args.ask is not None else args.prompt
    if not text.strip():
        raise PipelineError("prompt: empty; give some text to continue")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
        raise PipelineError(
            f"{'--ask/--context' if args.ask is not None else 'prompt'}: not valid UTF-8 text"
        ) from None
    return text


def prompt_of(model, tok: Tokenizer, text: str, args: argparse.Namespace) -> list[int]:
    """The prompt's ids: a pair's source for --translate, else text after </s>; its end where it
    is longer than the context (said on stderr)."""
    ids = tok.encode([text])[0]
    prompt = tok.pair_prompt(ids, target_language(tok, args.to)) if args.translate else [tok.eos_id, *ids]
    kept = keep_end(model, prompt, 1)  # room for one new token; the window slides on from there
    if len(kept) < len(prompt):
        print(
            f"note: the prompt has {len(prompt)} tokens, more than the context of {model.block_size}; "
            f"using its last {len(kept)}",
            file=sys.stderr,
        )
        prompt = kept
    return prompt


def print_stream(model, tok: Tokenizer, prompt: list[int], decoding: Decoding) -> None:
    """Print each piece as soon as it decodes to complete characters."""
    gen = torch.Generator().manual_seed(decoding.seed)
    text = TextStream(tok)
    for nxt in stream(model, torch.tensor([prompt]), tok.eos_id, decoding, gen):
        if int(nxt[0]) == tok.eos_id:
            break
        print(text.push(int(nxt[0])), end="", flush=True)
    print(text.rest())


def cli() -> None:
    """The console script (lmpipe-...): errors as one line, as `python -m` gives them."""
    run_main(main)


if __name__ == "__main__":
    cli()
