"""Data stages at scale: clean + tokenize at 10 MB, 100 MB and 1 GB, against sentencepiece's bare encode.

    python benchmarks/speed/data_scale.py [--sizes 10 100 1000] [--near-dup] [--quality] [--decontaminate 13]
        [--executors local ray] [--driver-share]

Needs the default corpora in data/raw (`dvc repro collect`). For each size it builds the input
(two local JSON lines files, read by the collect stage, whose time and memory are printed too)
from them: text documents of 8 to 40 lines drawn at random (fixed seed) from all of Shakespeare's
lines, and pairs of 2 to 4 verses drawn at random from the aligned King James / Synodal Bible (the
English side and the Russian side of the same verses), in the default corpus's proportion of
bytes (1/3 text, 2/3 pairs). Mixing lines across documents keeps exact and near-duplicate removal
from collapsing the input. Then, in a scratch project with this repository's params.yaml (plus
near-duplicate removal and the quality filters, if asked), it runs the clean and tokenize stages,
sampling every 0.2 s the proportional set size (PSS: shared pages counted once) summed over each
stage's processes, and times sentencepiece's multithreaded `encode` of the same input text with
the tokenizer the run trained (encode calls only). It prints, per size, the seconds per MB, the
throughput of clean + tokenize and of the bare encode, and the peak memory; then the three
ratios the scale issue asks for. With --executors local ray, each size runs collect, clean and
tokenize once per executor (data_run.executor; ray: a Ray head started here with every core, which
each stage joins by address, as it would a cluster's),
and a table compares their throughput, the driver's own peak memory (the stage's process alone,
its private pages: PSS would count its share of the Ray object store's pages it maps)
and a digest of every output (timing files apart). --driver-share runs clean once more in this
process with one worker, timing the shard work (what workers or Ray tasks do) against the rest,
the driver's, and counting the bytes of the shards' results. Decontamination is off unless --decontaminate is given: every
document here is made of the same lines, so most train documents share a 13-word sequence with
val or test and would be removed, which would leave the tokenizer little to do.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.data.tokenizer import ENCODE_BATCH, Tokenizer  # noqa: E402


def corpora(raw: Path) -> tuple[list[str], list[tuple[str, str]]]:
    for name in ("shakespeare", "bible_en_ru"):
        if not (raw / f"{name}.jsonl").is_file():
            sys.exit(f"{raw / name}.jsonl: missing; run `dvc repro collect` first")
    lines = [
        line
        for doc in (json.loads(x)["text"] for x in open(raw / "shakespeare.jsonl", encoding="utf-8"))
        for line in doc.split("\n")
        if line.strip()
    ]
    verses = [(r["src"], r["tgt"]) for r in map(json.loads, open(raw / "bible_en_ru.jsonl", encoding="utf-8"))]
    return lines, verses


def build_input(folder: Path, size_mb: int, lines: list[str], verses: list[tuple[str, str]]) -> tuple[int, list]:
    """Write {books,bible}.jsonl of about size_mb MB of text in all; return the text bytes and the
    collect sources that read them."""
    rng = random.Random(size_mb)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    sources = []
    for name, share in (("books", 1 / 3), ("bible", 2 / 3)):
        target, written = share * size_mb * 1e6, 0
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            while written < target:
                if name == "books":
                    rec = {"text": "\n".join(rng.choices(lines, k=rng.randint(8, 40)))}
                else:
                    picked = rng.choices(verses, k=rng.randint(2, 4))
                    rec = {"src": " ".join(s for s, _ in picked), "tgt": " ".join(t for _, t in picked)}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                written += sum(len(v.encode("utf-8")) for v in rec.values())
        sources.append(
            {
                "name": name,
                "kind": "file",
                "format": "jsonl",
                "path": str(folder / f"{name}.jsonl"),
                "license": "public domain",
            }
        )
        total += written
    return total, sources


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _uss_kb(pid: int) -> int:
    """A process's own memory (private pages: its unique set size), without the shared pages it
    maps, such as Ray's object store, whose pages are the store's."""
    total = 0
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    except OSError:
        pass
    return total


def _pss_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_stage(stage: str, cwd: Path) -> tuple[float, float, float]:
    """Run `python -m pipeline.<stage>`; return (seconds, peak PSS of its process tree in MB, peak
    unique memory (USS) of the stage's own process, the driver, in MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"pipeline.{stage}"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    peak = driver = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, driver
        while not done.is_set():
            driver = max(driver, _uss_kb(proc.pid))
            tree, todo = [], [proc.pid]
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo += _children(pid)
            peak = max(peak, sum(_pss_kb(p) for p in tree))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.communicate()[0]
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{stage} failed:\n{out[-3000:]}")
    print("   ", out.strip().splitlines()[-1][:200], flush=True)
    return seconds, peak / 1024, driver / 1024


def bare_encode(corpus: Path, model: Path, threads: int) -> float:
    """Seconds that sentencepiece's multithreaded encode takes over the input text (reading excluded)."""
    tok = Tokenizer(model)
    seconds = 0.0
    for name in ("books", "bible"):
        with open(corpus / f"{name}.jsonl", encoding="utf-8") as f:
            while batch := list(itertools.islice(f, ENCODE_BATCH)):
                texts = [v for r in map(json.loads, batch) for k, v in r.items() if k in ("text", "src", "tgt")]
                t0 = time.perf_counter()
                tok.sp.encode(texts, num_threads=threads)
                seconds += time.perf_counter() - t0
    return seconds


class RayHead:
    """A Ray head on this machine with all its cores (`ray start --head --block`), which the stages
    join by address, as they would a cluster's; stopped by its process id."""

    def __init__(self, cpus: int):
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        ray = str(Path(sys.executable).parent / "ray")
        self.proc = subprocess.Popen(
            [ray, "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        host = subprocess.run(
            [sys.executable, "-c", "import ray; print(ray.util.get_node_ip_address())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.address = f"{host}:{port}"
        for _ in range(300):  # until the head answers
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(2)
        print(f"ray head at {self.address} ({cpus} CPUs)", flush=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def outputs(project: Path) -> str:
    """A digest of every file under data/ and metrics/ but the timing files: equal digests, equal bytes."""
    import hashlib

    digest = hashlib.sha256()
    for folder in ("data", "metrics"):
        for f in sorted((project / folder).rglob("*")):
            if f.is_file() and "timing" not in f.parts and ".dvc" not in f.parts:
                digest.update(str(f.relative_to(project)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def driver_share(project: Path) -> dict:
    """clean once more, in this process with one worker (every shard prepared here, in order): the
    seconds in the shard work (prepare_shard, ngram_shard, qa_shard: what workers or Ray tasks do) against the
    whole stage; the rest is the driver's (reading shards, deciding duplicates in order, writing,
    the QA set and the report). Also the pickled bytes of the shards' results, what crosses to
    the driver, per input byte."""
    import contextlib
    import pickle

    import pipeline.clean as clean

    spent = {"tasks_s": 0.0, "result_bytes": 0, "shards": 0}

    def timed(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            result = fn(*a, **k)
            spent["tasks_s"] += time.perf_counter() - t0
            spent["result_bytes"] += len(pickle.dumps(result, protocol=5))
            spent["shards"] += 1
            return result

        return run

    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    saved = (project / "params.yaml").read_text(encoding="utf-8")
    params["clean_run"]["workers"] = 1
    params["data_run"]["executor"] = "local"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    originals = clean.prepare_shard, clean.ngram_shard, clean.qa_shard
    clean.prepare_shard, clean.ngram_shard, clean.qa_shard = map(timed, originals)
    try:
        with contextlib.chdir(project), contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            clean.main()
            total = time.perf_counter() - t0
    finally:
        clean.prepare_shard, clean.ngram_shard, clean.qa_shard = originals
        (project / "params.yaml").write_text(saved, encoding="utf-8")
    raw = sum(f.stat().st_size for f in (project / "data/raw").glob("*.jsonl"))
    return {"total_s": total, **spent, "driver_s": total - spent["tasks_s"], "raw_bytes": raw}


def print_executors(compared: dict, rows: dict, executors: list[str]) -> None:
    """Each executor's collect + clean + tokenize beside the first's; the driver's share and peak."""
    first = executors[0]
    print(
        f"\n| input | executor | collect s | clean s | tokenize s | MB/s | vs {first} | driver peak USS MB (clean / tokenize) | outputs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size, runs in compared.items():
        base = sum(runs[first][s][0] for s in ("collect", "clean", "tokenize"))
        for executor, run in runs.items():
            seconds = sum(run[s][0] for s in ("collect", "clean", "tokenize"))
            same = "identical" if run["outputs"] == runs[first]["outputs"] else "DIFFERENT"
            print(
                f"| {rows[size]['mb']:,.0f} MB | {executor} | {run['collect'][0]:.1f} | {run['clean'][0]:.1f} | "
                f"{run['tokenize'][0]:.1f} | {rows[size]['mb'] / seconds:.2f} | {base / seconds:.2f}x | "
                f"{run['clean'][2]:,.0f} / {run['tokenize'][2]:,.0f} | {same} |"
            )
    for size, runs in compared.items():
        d = runs[first].get("driver")
        if d:
            print(
                f"\n{rows[size]['mb']:,.0f} MB, clean with one worker in one process: {d['total_s']:.1f} s, of which "
                f"shard work {d['tasks_s']:.1f} s ({d['shards']} shards, {d['tasks_s'] / d['shards'] * 1000:.0f} ms each) "
                f"and the driver {d['driver_s']:.1f} s: driver share {d['driver_s'] / d['total_s']:.1%}; "
                f"results {d['result_bytes'] / d['raw_bytes']:.2f} bytes per input byte"
            )
        if "ray" in runs and first == "local" and d:
            overhead = (runs["ray"]["clean"][0] - runs["local"]["clean"][0]) / d["shards"]
            print(f"  ray's clean minus the local pool's, per shard: {overhead * 1000:+.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="input sizes in MB")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lmpipe-data-scale"))
    ap.add_argument("--near-dup", action="store_true", help="clean.near_dup: true")
    ap.add_argument("--quality", action="store_true", help="clean.quality_filters: true")
    ap.add_argument("--decontaminate", type=int, default=0, help="clean.decontaminate_ngram (0: off)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch projects")
    ap.add_argument(
        "--executors", nargs="+", default=["local"], choices=["local", "ray"], help="data_run.executor, side by side"
    )
    ap.add_argument("--driver-share", action="store_true", help="clean's driver share, measured in this process")
    args = ap.parse_args()
    compared: dict[int, dict] = {}
    head = RayHead(len(os.sched_getaffinity(0))) if "ray" in args.executors else None
    try:
        run_sizes(args, compared, head)
    finally:
        if head:
            head.stop()


def run_sizes(args, compared: dict, head) -> None:
    lines, verses = corpora(REPO / "data/raw")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["clean"].update(near_dup=args.near_dup, quality_filters=args.quality, decontaminate_ngram=args.decontaminate)
    threads = len(os.sched_getaffinity(0))
    print(
        f"data_scale: {threads} cores; clean near_dup {args.near_dup}, quality_filters {args.quality}, "
        f"decontaminate_ngram {args.decontaminate}, workers {params['clean_run']['workers'] or threads}, "
        f"shard_bytes {params['clean_run']['shard_bytes']:,}; tokenize sample_bytes {params['tokenize']['sample_bytes']:,}"
    )
    rows = {}
    for size in args.sizes:
        project = args.workdir / f"{size}mb"
        shutil.rmtree(project, ignore_errors=True)
        (project / "metrics").mkdir(parents=True)
        t0 = time.perf_counter()
        nbytes, sources = build_input(project / "corpus", size, lines, verses)
        print(f"{size} MB: input {nbytes / 1e6:,.1f} MB of text built in {time.perf_counter() - t0:.0f} s", flush=True)
        params["collect"].update(sources=sources, max_documents=0)
        (project / "params.yaml").write_text(
            yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
        runs = {}
        for executor in args.executors:  # the first one's outputs are the reference, and its row below
            params["data_run"]["executor"] = executor
            params["data_run"]["address"] = head.address if executor == "ray" else ""
            (project / "params.yaml").write_text(
                yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8"
            )
            runs[executor] = {stage: run_stage(stage, project) for stage in ("collect", "clean", "tokenize")}
            runs[executor]["outputs"] = outputs(project)
            if executor == args.executors[0] and args.driver_share:
                runs[executor]["driver"] = driver_share(project)
        (collect_s, collect_mb, _), (clean_s, clean_mb, _), (tok_s, tok_mb, _) = (
            runs[args.executors[0]][stage] for stage in ("collect", "clean", "tokenize")
        )
        compared[size] = runs
        encode_s = bare_encode(project / "corpus", project / "data/tokens/tokenizer.model", threads)
        kept = json.loads((project / "metrics/clean.json").read_text())["documents_kept"]
        mb = nbytes / 1e6
        rows[size] = r = {
            "mb": mb,
            "collect_s": collect_s,
            "collect_peak_mb": collect_mb,
            "clean_s": clean_s,
            "tokenize_s": tok_s,
            "encode_s": encode_s,
            "clean_peak_mb": clean_mb,
            "tokenize_peak_mb": tok_mb,
            "documents_kept": kept,
        }
        r["s_per_mb"] = (clean_s + tok_s) / mb
        r["pipeline_mb_s"] = mb / (clean_s + tok_s)
        r["encode_mb_s"] = mb / encode_s
        r["peak_mb"] = max(clean_mb, tok_mb)
        print(
            f"  collect {collect_s:.1f} s (peak {collect_mb:,.0f} MB); clean {clean_s:.1f} s (peak {clean_mb:,.0f} MB), tokenize {tok_s:.1f} s (peak {tok_mb:,.0f} MB): "
            f"{r['s_per_mb']:.3f} s/MB, {r['pipeline_mb_s']:.2f} MB/s; bare sentencepiece encode "
            f"{encode_s:.1f} s, {r['encode_mb_s']:.2f} MB/s; clean+tokenize / encode throughput "
            f"{r['pipeline_mb_s'] / r['encode_mb_s']:.2f}",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(project, ignore_errors=True)
    if len(args.executors) > 1 or args.driver_share:
        print_executors(compared, rows, args.executors)
    print(
        "\n| input | collect s (peak MB) | clean s | tokenize s | clean+tokenize s/MB | clean+tokenize MB/s | "
        "bare encode MB/s | ratio | clean peak MB | tokenize peak MB | documents kept |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(
            f"| {r['mb']:,.0f} MB | {r['collect_s']:.1f} ({r['collect_peak_mb']:,.0f}) | {r['clean_s']:.1f} | "
            f"{r['tokenize_s']:.1f} | {r['s_per_mb']:.3f} | "
            f"{r['pipeline_mb_s']:.2f} | {r['encode_mb_s']:.2f} | {r['pipeline_mb_s'] / r['encode_mb_s']:.2f} | "
            f"{r['clean_peak_mb']:,.0f} | {r['tokenize_peak_mb']:,.0f} | {r['documents_kept']:,} |"
        )
    sizes = sorted(rows)
    if len(sizes) >= 2:
        big, mid = rows[sizes[-1]], rows[sizes[-2]]
        per_doc = (
            (big["clean_peak_mb"] - mid["clean_peak_mb"]) * 1e6 / max(1, big["documents_kept"] - mid["documents_kept"])
        )
        print(
            f"\nat {sizes[-1]} MB: clean+tokenize / bare encode throughput {big['pipeline_mb_s'] / big['encode_mb_s']:.2f} "
            f"(need >= 0.5); s/MB vs {sizes[-2]} MB {big['s_per_mb'] / mid['s_per_mb']:.2f}x (need <= 1.3); "
            f"peak memory vs {sizes[-2]} MB {big['peak_mb'] / mid['peak_mb']:.2f}x (need <= 1.5), "
            f"{big['peak_mb']:,.0f} MB (need < 3000); clean's peak grew {per_doc:,.0f} bytes per kept document"
        )


if __name__ == "__main__":
    main()
