"""Answering a question: the QA prompt `<src> <qa> question <tgt>` (pipeline.data.qa), decoded,
its first line taken as the answer. Used by evaluate (pipeline.evaluation.qa) and `generate --ask`."""

from __future__ import annotations

from pipeline.core.common import PipelineError
from pipeline.data.qa import TASK
from pipeline.decoding.decode import generate, keep_end

ANSWER_TOKENS = 32  # an answer is a name or a title


def first_answer(text: str) -> str:
    """The answer a model wrote: its first line (an answer is short; what follows is not it)."""
    return text.strip().split("\n", 1)[0].strip()


def check_question(question: str, key: str = "--ask") -> str:
    if not question.strip():
        raise PipelineError(f"{key}: the question is empty")
    return question


def question_prompts(model, tok, questions: list[str], new_tokens: int) -> list[list[int]]:
    """Each question rendered as in training (`<src> <qa> question <tgt>`); a long passage is cut
    from the left, leaving room for `new_tokens` of answer."""
    return [keep_end(model, tok.pair_prompt(ids, task=TASK), new_tokens) for ids in tok.encode(questions)]


def answer(
    model,
    tok,
    questions: list[str],
    decoding,
    batch_size: int,
    device: str,
    label: str | None = None,
    compile: bool = False,
) -> list[str]:
    """The model's answers: each question rendered as in training, its first line decoded."""
    prompts = question_prompts(model, tok, questions, decoding.max_new_tokens)
    out = generate(model, prompts, tok.eos_id, decoding, batch_size, device, label, compile)
    return [first_answer(tok.decode(o)) for o in out]
