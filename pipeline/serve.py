"""A local web page to try a trained model: continue text, translate, ask (pipeline.serving).

python -m pipeline.serve                       # http://127.0.0.1:8000/ ; Ctrl+C stops
python -m pipeline.serve --port 8080 --checkpoint data/model/last.safetensors
python -m pipeline.serve --host 0.0.0.0        # reachable from other machines, with the token it prints

Only its own page drives it: a request naming another host (DNS rebinding), a POST from another
site's page, or, bound beyond loopback, an API call without the token printed at start, is refused
(pipeline.serving.app.Access). --allow-host NAME lets a browser reach it by another name.

Needs the [serve] extra: pip install -e ".[serve]" (Starlette and uvicorn; [dev] includes it).
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import torch

from pipeline.core.common import PipelineError, run_main
from pipeline.core.paths import BEST_WEIGHTS, EVAL_METRICS, TOKENIZER
from pipeline.data.tokenizer import Tokenizer
from pipeline.model.weights import load_model
from pipeline.serving import app as web
from pipeline.serving.card import model_card
from pipeline.serving.engine import Engine

try:
    import uvicorn
except ImportError:  # the [serve] extra is not installed: said when serve runs, in one line
    uvicorn = None

WILDCARD = ("0.0.0.0", "::")  # every interface: the machine's own name is allowed too


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.serve", description="Try a trained model in a web page.")
    ap.add_argument("--checkpoint", default=str(BEST_WEIGHTS))
    ap.add_argument("--tokenizer", default=str(TOKENIZER))
    ap.add_argument("--metrics", default=str(EVAL_METRICS.parent), help="the folder of eval.json and train.json")
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name (or address) the page may be reached by, besides the address it listens on and "
        "localhost (repeatable); any other Host header gets 403",
    )
    ap.add_argument(
        "--token",
        action="store_true",
        help="ask for a token on every API call even on loopback (a machine other people log in to); "
        "beyond loopback it always does. The URL printed at start carries it",
    )
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--max-new-tokens", type=int, default=256, help="the cap on new tokens per request")
    ap.add_argument("--max-beam-size", type=int, default=8, help="the cap on a request's beam size")
    ap.add_argument("--max-rows", type=int, default=32, help="rows decoded at once (a beam search: beam size each)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests that may wait; one more is told 'busy' (503)")
    return ap


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now so that a port in use is said in one line."""
    if not 0 <= port < 65536:
        raise PipelineError(f"--port: must be 0 (any free port) to 65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        if e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            raise PipelineError(f"--port {port}: already in use on {host}; choose another with --port") from None
        raise PipelineError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    missing = web.MISSING or (uvicorn is None and "uvicorn")
    if missing:
        raise PipelineError(f'serve needs the [serve] extra ({missing} is not installed): pip install -e ".[serve]"')
    for key in ("max_new_tokens", "max_beam_size", "max_rows", "max_queue"):
        if getattr(args, key) < 1:
            raise PipelineError(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
    tok = Tokenizer(args.tokenizer)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.checkpoint, tok, args.tokenizer, device)
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    allow = tuple(args.allow_host) + ((socket.gethostname(),) if args.host in WILDCARD else ())
    access = web.Access.serving(args.host, port, allow, require_token=args.token)
    if args.host not in web.LOOPBACK:
        print(
            f"warning: listening on {args.host}: anyone who can reach this machine and has the URL's token can "
            "use the model; the default, 127.0.0.1, is this machine only",
            file=sys.stderr,
        )
    engine = Engine(model, tok, max_rows=args.max_rows, max_queue=args.max_queue)
    limits = web.Limits(max_new_tokens=args.max_new_tokens, max_beam_size=args.max_beam_size)
    card = model_card(Path(args.checkpoint), tok, Path(args.metrics))
    app = web.create_app(model, tok, engine, card, limits, access)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    query = f"?token={access.token}" if access.token else ""
    print(f"serving {args.checkpoint} at http://{shown}:{port}/{query} (Ctrl+C stops)", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, http="h11", log_level="warning", timeout_graceful_shutdown=2)).run(
            sockets=[sock]
        )
    finally:
        engine.close()
        sock.close()


def cli() -> None:
    """The console script (lmpipe-...): errors as one line, as `python -m` gives them."""
    run_main(main)


if __name__ == "__main__":
    cli()
