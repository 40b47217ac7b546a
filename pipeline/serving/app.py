"""The playground's HTTP side (Starlette): the page, the model's card, and decoding as a stream of
server-sent events.

    GET  /               the page (plain HTML, CSS and JS from pipeline/serving/page: no build step, no CDN)
    GET  /api/info       the model card (pipeline.serving.card), the modes it offers and the limits
    POST /api/generate   {"mode": "continue" | "translate" | "ask", "text": ..., settings}
                         -> text/event-stream: start {id}, token {text}..., done {reason} | error {message}
    POST /api/stop       {"id": ...}: the request ends at its next step

Everything a request can get wrong is a 4xx with {"error": one line}; the server keeps serving.
No request names a file: the checkpoint is chosen at start.

Only its own page drives it (`Access`, checked before any route): a Host header that is not the
server's own (DNS rebinding) gets 403; an API call without the server's token, where it has one
(bound beyond loopback), 401; a POST whose Origin is another site's, 403; a POST that is not
`application/json` in UTF-8 (a browser's "simple" cross-site request), 415. No CORS header ever
opens it to another origin, and a JSON body nested deeper than MAX_DEPTH is refused before it is
parsed.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

try:  # the [serve] extra; pipeline.serve says in one line when it is missing
    from starlette.applications import Starlette
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:
    MISSING = e.name
else:
    MISSING = None

from pipeline.core.common import PipelineError
from pipeline.core.params import Evaluate
from pipeline.data.qa import question_text
from pipeline.decoding.answer import ANSWER_TOKENS, question_prompts
from pipeline.decoding.decode import Decoding, keep_end
from pipeline.serving.engine import Busy, Engine, Request

PAGE = Path(__file__).with_name("page")
FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
}
MODES = ("continue", "translate", "ask")
# each field a request may set, with its type; anything else is refused
FIELDS = {
    "mode": str,
    "text": str,
    "context": str,
    "to": str,
    "max_new_tokens": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "repetition_penalty": float,
    "no_repeat_ngram": int,
    "beam_size": int,
    "length_penalty": float,
}
SETTINGS = tuple(k for k in FIELDS if k not in ("mode", "text", "context", "to"))  # a request's decoding


@dataclass
class Limits:
    """What one request may ask for: the server's caps (set at start, see `python -m pipeline.serve -h`)."""

    max_body_bytes: int = 64 * 1024
    max_text_bytes: int = 8 * 1024  # text and context, UTF-8
    max_new_tokens: int = 256
    max_beam_size: int = 8


LOOPBACK = ("127.0.0.1", "localhost", "::1")  # addresses that reach this machine only
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")  # as a Host header names them
MAX_DEPTH = 8  # a request's JSON is one flat object; deeper nesting is refused before parsing


@dataclass(frozen=True)
class Access:
    """Who may drive the server: the names a Host header may carry (with `port`, where set), and
    the token every API call must carry (`Authorization: Bearer TOKEN`), where there is one."""

    hosts: frozenset[str] = frozenset(LOOPBACK_NAMES)
    port: int | None = None  # None: any port (in-process tests)
    token: str | None = None

    @classmethod
    def serving(cls, address: str, port: int, allow: tuple[str, ...] = (), require_token: bool = False) -> Access:
        """The server's own: the address it listens on, the loopback names, the hosts allowed by
        name; a token, made here, when it listens beyond loopback (or `require_token`)."""
        names = {*LOOPBACK_NAMES, _bracketed(address), *(_bracketed(a) for a in allow)}
        token = secrets.token_urlsafe(32) if require_token or address not in LOOPBACK else None
        return cls(frozenset(n.lower() for n in names), port, token)

    def refusal(self, method: str, path: str, headers: Headers) -> tuple[int, str] | None:
        """(status, one line) for a request this server must not serve, before any route; None if it may."""
        hosts = headers.getlist("host")
        if len(hosts) != 1:
            return 400, f"the request must carry one Host header, not {len(hosts)}"
        name, port = _split_host(hosts[0])
        if name is None or name not in self.hosts or (self.port is not None and port != self.port):
            return (
                403,
                f"Host '{hosts[0][:100]}' is not this server's (start it with --allow-host NAME to allow a name)",
            )
        if path.startswith("/api/") and self.token is not None:
            given = headers.get("authorization", "")
            if not given.startswith("Bearer ") or not secrets.compare_digest(given[7:].encode(), self.token.encode()):
                return 401, "no valid token: open the URL with ?token= that the server printed when it started"
        if method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin is not None and origin.lower() != f"http://{hosts[0].lower()}":
                return 403, f"Origin '{origin[:100]}' is not this server's: only its own page may call it"
        if method == "POST":  # the routes with a body (other methods: 405 from the router)
            media, _, rest = headers.get("content-type", "").partition(";")
            charset = re.search(r"charset=\"?([\w-]+)", rest, re.IGNORECASE)
            if media.strip().lower() != "application/json" or (charset and charset[1].lower() != "utf-8"):
                return 415, f"Content-Type '{headers.get('content-type', '')[:100]}': send application/json (UTF-8)"
            encoding = headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                return 415, f"Content-Encoding '{encoding[:40]}' is not accepted: send the JSON as it is"
        return None


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _split_host(host: str) -> tuple[str | None, int | None]:
    """A Host header's name (lower case, an IPv6 address in brackets) and port (80 when none)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        name, port = name + "]", rest.removeprefix(":") if rest else ""
    else:
        name, _, port = host.partition(":")
    if not name or (port and not port.isdigit()) or len(port) > 5:
        return None, None
    return name, int(port) if port else 80


class Guard:
    """ASGI middleware: `Access.refusal` before any route (a 404 included)."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refused = self.access.refusal(scope["method"], scope["path"], Headers(scope=scope))
            if refused is not None:
                return await _error(refused[1], refused[0])(scope, receive, send)
        await self.app(scope, receive, send)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_json(request: HttpRequest, limit: int) -> dict:
    """The request's JSON object, read no further than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body of {declared} bytes, more than the limit of {limit}", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"request body over the limit of {limit} bytes", 413)
    depth = _depth(bytes(body))
    if depth > MAX_DEPTH:
        raise BadRequest(f"JSON nested {depth} deep, more than the limit of {MAX_DEPTH}")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"malformed JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), counted in one
    pass without parsing it: json.loads recurses once per level, and 60,000 '[' exhaust the stack."""
    brackets = body.count(b"[") + body.count(b"{")
    if brackets <= MAX_DEPTH:
        return brackets  # no deeper than that: the one pass is for bodies that could be
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _checked_fields(data: dict) -> dict:
    for key, value in data.items():
        kind = FIELDS.get(key)
        if kind is None:
            raise BadRequest(f"unknown field '{key}' (known: {', '.join(FIELDS)})")
        ok = isinstance(value, kind) if kind is not float else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or (kind is float and not math.isfinite(value)):
            raise BadRequest(f"{key}: must be {'a finite number' if kind is float else kind.__name__}, got {value!r}")
    if data.get("mode") not in MODES:
        raise BadRequest(f"mode: must be one of {', '.join(MODES)}, got {data.get('mode')!r}")
    return data


def mode_defaults(mode: str, limits: Limits) -> Decoding:
    """A mode's decoding before a request's own settings: to continue, evaluate's sampling
    (pipeline.core.params.Evaluate, as `python -m pipeline.generate`'s); greedy to translate or answer."""
    e, cap = Evaluate(), limits.max_new_tokens
    if mode == "continue":
        return Decoding(min(e.sample_tokens, cap), **e.sampling())
    return Decoding(ANSWER_TOKENS if mode == "ask" else min(e.sample_tokens, cap))


class Playground:
    """The routes over one model, its tokenizer and its engine."""

    def __init__(self, model, tok, engine: Engine, card: dict, limits: Limits):
        self.model, self.tok, self.engine, self.card, self.limits = model, tok, engine, card, limits
        self.defaults = {mode: mode_defaults(mode, limits) for mode in MODES}

    def decoding(self, data: dict) -> Decoding:
        """The request's decoding: the mode's defaults, its own settings, the server's caps."""
        lim = self.limits
        decoding = replace(self.defaults[data["mode"]], **{k: data[k] for k in SETTINGS if k in data})
        if not 0 < decoding.max_new_tokens <= lim.max_new_tokens:
            raise BadRequest(
                f"max_new_tokens: must be 1 to {lim.max_new_tokens} (the server's cap), got {decoding.max_new_tokens}"
            )
        if not 1 <= decoding.beam_size <= lim.max_beam_size:
            raise BadRequest(
                f"beam_size: must be 1 to {lim.max_beam_size} (the server's cap), got {decoding.beam_size}"
            )
        try:
            decoding.check()
        except PipelineError as e:
            raise BadRequest(str(e)) from None
        return decoding

    def request(self, data: dict) -> Request:
        """A decoding request from the body: the prompt as generate and evaluate render it."""
        data = _checked_fields(data)
        mode, tok = data["mode"], self.tok
        text, context = data.get("text", ""), data.get("context", "")
        if not text.strip():
            raise BadRequest("text: empty; " + ("ask a question" if mode == "ask" else "give some text"))
        for key, value in (("text", text), ("context", context)):
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate (\ud800) in the JSON
                raise BadRequest(f"{key}: not valid Unicode text") from None
            if size > self.limits.max_text_bytes:
                raise BadRequest(f"{key}: {size} bytes, more than the limit of {self.limits.max_text_bytes}", 413)
        if context and mode != "ask":
            raise BadRequest("context: only to ask a question")
        if "to" in data and mode != "translate":
            raise BadRequest("to: only to translate")
        decoding = self.decoding(data)
        if mode == "ask":
            if "qa" not in tok.tasks:
                raise BadRequest("ask: this model was not trained to answer questions (its tokenizer has no <qa>)")
            (prompt,) = question_prompts(self.model, tok, [question_text(text, context)], decoding.max_new_tokens)
            return Request(prompt, decoding, first_line=True)
        ids = tok.encode([text])[0]
        if mode == "translate":
            prompt = tok.pair_prompt(ids, self.direction(data.get("to", "")))
        else:
            prompt = [tok.eos_id, *ids]
        kept = keep_end(self.model, prompt, 1)
        note = f"the prompt has {len(prompt)} tokens, more than the context; using its last {len(kept)}"
        return Request(kept, decoding, note=note if len(kept) < len(prompt) else "")

    def direction(self, to: str) -> str | None:
        languages = sorted(self.tok.languages)
        if not to and len(languages) > 1:
            raise BadRequest(f"to: the model translates into {', '.join(languages)}; choose one")
        if to and to not in languages:
            known = ", ".join(languages) or "none (a model trained without language tags: leave 'to' out)"
            raise BadRequest(f"to: unknown direction '{to}' (the model translates into {known})")
        return to or (languages[0] if languages else None)

    async def page(self, request: HttpRequest) -> Response:
        name, media = FILES[request.url.path]
        return Response((PAGE / name).read_bytes(), media_type=media, headers={"Cache-Control": "no-cache"})

    async def info(self, request: HttpRequest) -> JSONResponse:
        limits = {k: getattr(self.limits, k) for k in ("max_text_bytes", "max_new_tokens", "max_beam_size")}
        defaults = {mode: {k: getattr(d, k) for k in SETTINGS} for mode, d in self.defaults.items()}
        return JSONResponse({**self.card, "limits": limits, "defaults": defaults, "load": self.engine.load})

    async def generate(self, request: HttpRequest) -> Response:
        try:
            req = self.request(await _read_json(request, self.limits.max_body_bytes))
        except BadRequest as e:
            return _error(str(e), e.status)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(event: dict) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            job = self.engine.submit(req, sink)
        except Busy as e:
            return _error(str(e), 503)

        async def stream():
            try:
                while True:
                    event = await events.get()
                    name = event.pop("event")
                    yield f"event: {name}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
                    if name in ("done", "error"):
                        return
            finally:  # the client went away, or the stream ended: stop decoding for nobody
                self.engine.stop(job.id)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def stop(self, request: HttpRequest) -> JSONResponse:
        try:
            data = await _read_json(request, self.limits.max_body_bytes)
        except BadRequest as e:
            return _error(str(e), e.status)
        if set(data) != {"id"} or not isinstance(data["id"], str):
            return _error('the body must be {"id": "<the id of a start event>"}', 400)
        return JSONResponse({"stopped": self.engine.stop(data["id"])})


async def _http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
    return _error(f"{exc.detail}: {request.method} {request.url.path}", exc.status_code)


def create_app(
    model, tok, engine: Engine, card: dict, limits: Limits | None = None, access: Access | None = None
) -> Starlette:
    """The playground's app; `access` says who may drive it (default: loopback names, no token)."""
    pg = Playground(model, tok, engine, card, limits or Limits())
    routes = [Route(path, pg.page, methods=["GET"]) for path in FILES]
    routes += [
        Route("/api/info", pg.info, methods=["GET"]),
        Route("/api/generate", pg.generate, methods=["POST"]),
        Route("/api/stop", pg.stop, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(Guard, access=access or Access())],
        exception_handlers={HTTPException: _http_error},
    )
