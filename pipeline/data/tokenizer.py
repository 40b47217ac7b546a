"""The tokenizer and the token files: what every stage after tokenize reads.

`Tokenizer` wraps the sentencepiece model that `tokenize` trains. It is lossless
(decode(encode(text)) == text) and every token has an exact UTF-8 byte length, so bits per byte
are exact. A document is rendered as `text </s>`, a pair as `<src> source <tgt> target </s>`, or
`<src> <2ru> source <tgt> target </s>` when its source names the languages (the target's tag,
pipeline.core.languages), and a question/answer pair `<src> <qa> question <tgt> answer </s>` (the task's
tag, pipeline.data.qa).

Token files: data/tokens/{split}.bin, a flat stream of token ids (uint16 when the vocabulary fits,
else uint32) beginning with </s>, and a JSON sidecar {split}.json with its dtype, vocabulary size,
token and byte counts, and each source's token range.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pipeline.core.common import PipelineError, read_json
from pipeline.core.languages import tag
from pipeline.core.paths import TOKENS_DIR

SRC, TGT = "<src>", "<tgt>"
ENCODE_BATCH = 20000  # records per multithreaded encode call


class Tokenizer:
    """A sentencepiece model plus the ids and byte lengths this pipeline relies on."""

    def __init__(self, model_file: str | Path):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise PipelineError(f"{model_file}: tokenizer missing (run the tokenize stage: dvc repro)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError):
            raise PipelineError(
                f"{model_file}: not a sentencepiece model (damaged?); re-run the tokenize stage"
            ) from None
        self._index()

    @classmethod
    def from_bytes(cls, model: bytes) -> Tokenizer:
        """The tokenizer of a model's bytes (tokenizer.model's), with no file: a Ray task's."""
        tok = cls.__new__(cls)
        tok.sp = spm.SentencePieceProcessor(model_proto=model)
        tok._index()
        return tok

    def _index(self) -> None:
        """The ids this pipeline relies on: the end token, <src>, <tgt>, and each tag's."""
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.src_id = self.sp.piece_to_id(SRC)
        self.tgt_id = self.sp.piece_to_id(TGT)
        # target-language tags <2xx> and task tags <qa>: control pieces, as <src> and <tgt>
        tags = {
            piece: i
            for i in range(self.vocab_size)
            if self.sp.is_control(i)
            and i not in (self.sp.bos_id(), self.eos_id)
            and (piece := self.sp.id_to_piece(i)) not in (SRC, TGT)
        }
        self.languages = {piece[2:-1]: i for piece, i in tags.items() if piece.startswith("<2")}
        self.tasks = {piece[1:-1]: i for piece, i in tags.items() if not piece.startswith("<2")}

    def encode(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads or (os.cpu_count() or 1))

    def encode_records(self, records: list[dict], num_threads: int = 0) -> list[list[int]]:
        """The ids of each record's texts, in the order render() takes them: text, or src then tgt."""
        return self.encode(
            [t for r in records for t in ((r["src"], r["tgt"]) if "src" in r else (r["text"],))], num_threads
        )

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def render(self, record: dict, ids: Iterator[list[int]], out: list[int]) -> None:
        """Append the token ids of one document or pair, ending with </s>, to `out`. `ids` yields
        the ids of the record's texts in text_fields() order: text, or src then tgt."""
        if "src" in record:
            out.append(self.src_id)
            if "tgt_lang" in record:
                out.append(self.language_id(record["tgt_lang"]))
            if "task" in record:
                out.append(self.task_id(record["task"]))
            out += next(ids)
            out.append(self.tgt_id)
        out += next(ids)
        out.append(self.eos_id)

    def language_id(self, code: str) -> int:
        if code not in self.languages:
            known = ", ".join(sorted(self.languages)) or "none: its pair sources name no languages"
            raise PipelineError(
                f"target language '{code}': the tokenizer has no tag {tag(code)} (its languages: {known})"
            )
        return self.languages[code]

    def task_id(self, task: str) -> int:
        if task not in self.tasks:
            raise PipelineError(
                f"task '{task}': the tokenizer has no tag <{task}> (the model was trained without {task} pairs)"
            )
        return self.tasks[task]

    def pair_prompt(self, src_ids: list[int], tgt_lang: str | None = None, task: str | None = None) -> list[int]:
        """What the model sees before it writes a target: the same context as in training."""
        tags = ([self.language_id(tgt_lang)] if tgt_lang else []) + ([self.task_id(task)] if task else [])
        return [self.eos_id, self.src_id, *tags, *src_ids, self.tgt_id]

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for: control tokens 0, byte tokens 1."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            out[i] = 1 if self.sp.is_byte(i) else len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def load_tokens(split: str, folder: Path = TOKENS_DIR) -> np.ndarray:
    """A split's token ids, memory-mapped, checked against its sidecar."""
    sidecar = folder / f"{split}.json"
    meta = read_json(sidecar)
    path = folder / f"{split}.bin"
    if not path.is_file():
        raise PipelineError(f"{path}: missing (run the tokenize stage: dvc repro)")
    if (
        not isinstance(meta, dict)
        or meta.get("dtype") not in ("uint16", "uint32")
        or not isinstance(meta.get("tokens"), int)
    ):
        found = (
            f"dtype {meta.get('dtype')!r}, tokens {meta.get('tokens')!r}" if isinstance(meta, dict) else "not an object"
        )
        raise PipelineError(
            f"{sidecar}: expected a 'dtype' of uint16 or uint32 and a token count ({found}); re-run the tokenize stage"
        )
    if path.stat().st_size % np.dtype(meta["dtype"]).itemsize:
        raise PipelineError(
            f"{path}: {path.stat().st_size} bytes, not a whole number of {meta['dtype']} tokens (truncated?); "
            "re-run the tokenize stage"
        )
    data = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(data) != meta["tokens"]:
        raise PipelineError(f"{path}: {len(data)} tokens but its sidecar says {meta['tokens']}; re-run tokenize")
    return data


def token_files_fingerprint(tokenizer_sha256: str, folder: Path = TOKENS_DIR) -> str:
    """The token files' identity: the tokenizer (its sha256, as the caller computed it), sidecars,
    and the sizes and ends of the .bin files."""
    h = hashlib.sha256(tokenizer_sha256.encode())
    for split in ("train", "val"):
        h.update((folder / f"{split}.json").read_bytes())
        path = folder / f"{split}.bin"
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, path.stat().st_size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()
