"""Load on the playground: N concurrent streaming requests against `python -m pipeline.serve` on
127.0.0.1 (the default model), then the same requests one at a time, in the same run.

    python benchmarks/speed/serve_load.py                      # 20 requests, after dvc repro
    python benchmarks/speed/serve_load.py --requests 40 --max-rows 64
    python benchmarks/speed/serve_load.py --beams 4 --old-rev 0404d2e --rounds 3   # beside older code

Half the requests continue text (sampled), half translate (greedy), their prompts of different
lengths, Russian and Chinese among them; --beams N of the continuations are beam searches of 4
(to --new-tokens: long ones), which used to run whole on the decoding thread while the streams
waited. Prints, for each way: the
time to the first token of the streamed requests (p50, p95), the time to the last, new tokens per
second in all, errors (which must be 0), and the server's peak resident memory (VmHWM).

--old-rev REV also serves the same requests with the code of commit REV (its pipeline/ taken from
git, in a process of its own), the two servers taking turns for --rounds rounds, so that both see
the same machine: compare their medians.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    ("continue", "ROMEO:"),
    ("translate", "Jesus wept."),
    ("continue", "KING HENRY. Once more unto the breach, dear friends, once more;"),
    ("translate", "And God said, Let there be light: and there was light."),
    ("continue", "Кто прослезился?"),
    ("translate", "Blessed are the meek: for they shall inherit the earth."),
    ("continue", "资源类型是什么?"),
    ("translate", "In the beginning God created the heaven and the earth."),
    ("continue", "To be, or not to be: that is the question:"),
    ("translate", "For God so loved the world, that he gave his only begotten Son."),
]


def one(port: int, mode: str, text: str, new_tokens: int, out: dict, beams: int = 1) -> None:
    """One streaming request; fills `out` with the seconds to its first token and to its end."""
    start = time.perf_counter()
    body = {"mode": mode, "text": text, "max_new_tokens": new_tokens}
    if beams > 1:
        body["beam_size"] = out["beams"] = beams
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            out["error"] = f"HTTP {r.status}: {r.read()[:200]!r}"
            return
        event = None
        for raw in r:
            line = raw.decode("utf-8").rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "token" and "first" not in out:
                    out["first"] = time.perf_counter() - start
                elif event == "done":
                    out["tokens"], out["reason"] = data["tokens"], data["reason"]
                elif event == "error":
                    out["error"] = data["message"]
        out["last"] = time.perf_counter() - start
        if "tokens" not in out and "error" not in out:
            out["error"] = "the stream ended without a done event"
    except Exception as e:  # counted as an error
        out["error"] = f"{type(e).__name__}: {e}"


def load(port: int, n: int, new_tokens: int, concurrent: bool, beams: int = 0) -> tuple[list[dict], float]:
    """n requests; the first `beams` that continue text are beam searches of 4 (a long one each)."""
    results = [{} for _ in range(n)]
    jobs = [(port, *PROMPTS[i % len(PROMPTS)], new_tokens, results[i]) for i in range(n)]
    searches = [i for i, job in enumerate(jobs) if job[1] == "continue"][:beams]
    jobs = [job + ((4,) if i in searches else ()) for i, job in enumerate(jobs)]
    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for job in jobs:
            one(*job)
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def report(name: str, results: list[dict], wall: float) -> None:
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    first = [r["first"] for r in ok if "first" in r and "beams" not in r]  # streamed requests
    tokens = sum(r.get("tokens", 0) for r in ok)
    print(
        f"{name:>12}: time to first token p50 {statistics.median(first):.3f} s, p95 {percentile(first, 0.95):.3f} s; "
        f"last token p50 {statistics.median(r['last'] for r in ok):.2f} s; {tokens} new tokens in {wall:.2f} s = "
        f"{tokens / wall:,.0f} tokens/s; errors {len(errors)}"
    )
    for e in errors[:3]:
        print(f"{'':>14}error: {e}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`python -m pipeline.serve` on a free port of 127.0.0.1, with this checkout's code or commit `rev`'s."""

    def __init__(self, args, rev: str, folder: Path):
        env = None
        if rev:
            archive = subprocess.run(["git", "archive", rev, "pipeline"], cwd=ROOT, check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
            env = {**os.environ, "PYTHONPATH": str(folder)}
        self.cmd = [sys.executable, "-m", "pipeline.serve", "--port", "0", "--checkpoint", args.checkpoint]
        self.cmd += ["--max-rows", str(args.max_rows)]
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line.startswith("serving "):
            self.close()
            sys.exit(f"error: the server did not start: {line.strip()}")
        self.port = int(line.split(" at ", 1)[1].split()[0].rsplit(":", 1)[1].strip("/"))
        load(self.port, 2, 8, concurrent=False)  # warm-up

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-rows", type=int, default=32)
    ap.add_argument("--beams", type=int, default=0, help="this many continuations are beam searches of 4")
    ap.add_argument("--old-rev", default="", help="also serve with this commit's code, taking turns")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--checkpoint", default="data/model/best.safetensors")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"this checkout": Server(args, "", Path(tmp))}
        try:
            if args.old_rev:
                servers[args.old_rev] = Server(args, args.old_rev, Path(tmp))
            print(
                f"servers: {' '.join(servers['this checkout'].cmd[1:])}; {args.requests} requests "
                f"({args.beams} beam searches), {args.new_tokens} new tokens at most"
            )
            for r in range(args.rounds):
                for name, server in servers.items():
                    print(f"round {r + 1}, {name}:")
                    results, wall = load(server.port, args.requests, args.new_tokens, True, args.beams)
                    report("concurrent", results, wall)
                    results, wall = load(server.port, args.requests, args.new_tokens, False, args.beams)
                    report("one by one", results, wall)
            for name, server in servers.items():
                print(f"{name}: server peak resident memory {peak_rss_mb(server.proc.pid):,.0f} MB")
        finally:
            for server in servers.values():
                server.close()


if __name__ == "__main__":
    main()
