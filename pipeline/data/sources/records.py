"""The record schema, a document {"text"} or a pair {"src", "tgt"} plus its "origin" (a QA pair
also "task": "qa", pipeline.qa), and the line-based record readers: JSON lines, and two aligned
files of sentence pairs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator

from pipeline.core.common import PipelineError
from pipeline.core.params import Source
from pipeline.data.qa import TASK, question_text


def record(row, columns: tuple[str, list[str]] | None, origin: str, where: str) -> dict:
    """A document {"text"} or pair {"src", "tgt"} from a JSON object or table row (a mapping).

    `columns` names the fields ("text", [names]), ("pair", [source, target]) or ("qa", [question,
    answer, context]: the context may be missing or empty); None means "text", or "src" and "tgt".
    """
    if columns is None:
        if isinstance(row.get("src"), str) and isinstance(row.get("tgt"), str):
            columns = ("pair", ["src", "tgt"])
        elif isinstance(row.get("text"), str):
            columns = ("text", ["text"])
        else:
            raise PipelineError(
                f"{where}: expected a string 'text' field, or string 'src' and 'tgt' fields "
                f"(or name them with text_columns / pair_columns)"
            )
    kind, names = columns
    values = []
    for k, name in enumerate(names):
        if kind == "qa" and k == 2 and row.get(name) in (None, ""):
            values.append("")  # no passage: a closed-book question
            continue
        if name not in row:
            raise PipelineError(f"{where}: no field {name!r} (has: {', '.join(map(str, row))})")
        if not isinstance(row[name], str):
            raise PipelineError(f"{where}: field {name!r} is {type(row[name]).__name__}, expected a string")
        values.append(row[name])
    if kind == "pair":
        return {"src": values[0], "tgt": values[1], "origin": origin}
    if kind == "qa":
        context = values[2] if len(values) > 2 else ""
        return {"src": question_text(values[0], context), "tgt": values[1], "task": TASK, "origin": origin}
    return {"text": "\n\n".join(values), "origin": origin}


def named_columns(src: Source) -> tuple[str, list[str]] | None:
    """The columns `src` names for record(): its pair_columns or text_columns, its QA columns, else
    None (the defaults)."""
    if src.task == TASK:
        return "qa", src.qa_columns or ["question", "answer", "context"]
    if src.pair_columns:
        return "pair", src.pair_columns
    if src.text_columns:
        return "text", src.text_columns
    return None


def records_from_jsonl(lines: Iterable[str], origin: str, columns=None) -> Iterator[dict]:
    """A record from each non-blank line, a JSON object; errors name the file and line."""
    # Lines end at "\n" (or CR) only: JSON strings may hold U+2028, which splitlines() breaks on.
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise PipelineError(f"{origin}:{lineno}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise PipelineError(
                f"{origin}:{lineno}: expected an object with a string 'text' field, or string 'src' and 'tgt' fields"
            )
        yield record(obj, columns, origin, f"{origin}:{lineno}")


def records_from_aligned(
    src_text: str, tgt_text: str, src_origin: str, tgt_origin: str, stats: Counter
) -> Iterator[dict]:
    """Pairs from two files whose line i translate each other; a line empty on either side is skipped."""
    stats["crlf_lines"] += src_text.count("\r\n") + tgt_text.count("\r\n")
    src_lines = src_text.replace("\r\n", "\n").split("\n")
    tgt_lines = tgt_text.replace("\r\n", "\n").split("\n")
    for lines in (src_lines, tgt_lines):
        if lines and lines[-1] == "":
            lines.pop()
    if len(src_lines) != len(tgt_lines):
        raise PipelineError(
            f"{src_origin} has {len(src_lines)} lines but {tgt_origin} has {len(tgt_lines)}; "
            f"aligned files need one line per sentence on both sides"
        )
    for src_line, tgt_line in zip(src_lines, tgt_lines):
        if src_line.strip() and tgt_line.strip():
            yield {"src": src_line.strip(), "tgt": tgt_line.strip(), "origin": src_origin.rsplit("/", 1)[-1]}
        else:
            stats["empty_aligned_lines"] += 1
