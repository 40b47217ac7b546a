"""The record schema, a document {"text"} or a pair {"src", "tgt"} plus its "origin" (a QA pair
also "task": "qa", pipeline.qa), the line-based record readers (JSON lines, and two aligned files
of sentence pairs), and the Tally collect keeps of the records it writes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator

from pipeline.core.common import PipelineError, utf8_bytes
from pipeline.core.languages import CHECKED_PAIRS
from pipeline.core.params import Source
from pipeline.data.qa import TASK, question_text

TITLE_CHARS = 100


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


def json_line(rec: dict) -> bytes:
    """A record as data/raw writes it: one line of JSON, UTF-8."""
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


class Tally:
    """What collect keeps of a source's records as it writes them, in order: their number and text
    bytes, whether they are pairs (a source mixing them with text records is an error), each
    origin's title (format text: its first line; the default QA set asks for it), the first CHECKED_PAIRS records where the source
    names languages (their sides are checked), and the pairs whose source or target side is empty.

    A Ray task tallies the records of one file; merge() adds that tally to the source's as if its
    records had been added one by one."""

    def __init__(self, src: Source):
        self.name = src.name
        self.titled = src.format == "text" and src.kind != "hf"
        self.checked = bool(src.languages)
        self.documents = self.bytes = 0
        self.pairs: bool | None = None
        self.origin = ""  # the first record's
        self.titles: dict[str, str] = {}
        self.first: list[dict] = []
        self.empty_sides: Counter = Counter()

    def add(self, rec: dict) -> None:
        is_pair = "src" in rec
        self.kind(is_pair, rec["origin"])
        if self.titled and rec["origin"] not in self.titles:
            self.titles[rec["origin"]] = rec["text"].strip().split("\n", 1)[0].strip()[:TITLE_CHARS]
        if self.checked and len(self.first) < CHECKED_PAIRS:
            self.first.append(rec)
        if is_pair:
            self.empty_sides.update(side for side in ("src", "tgt") if not rec[side].strip())
        self.documents += 1
        self.bytes += utf8_bytes(rec)

    def kind(self, pairs: bool, origin: str) -> None:
        """Records of one kind: pairs, or texts."""
        if self.pairs is None:
            self.pairs, self.origin = pairs, origin
        elif self.pairs != pairs:
            raise PipelineError(
                f"source '{self.name}': mixes text records and src/tgt pairs ({origin}); split it into two sources"
            )

    def merge(self, later: Tally) -> None:
        """Add the tally of the records that follow these."""
        if not later.documents:
            return
        self.kind(later.pairs, later.origin)
        for origin, title in later.titles.items():
            self.titles.setdefault(origin, title)
        self.first += later.first[: max(0, CHECKED_PAIRS - len(self.first))]
        self.empty_sides.update(later.empty_sides)
        self.documents += later.documents
        self.bytes += later.bytes
