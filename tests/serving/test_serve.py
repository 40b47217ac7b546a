"""The playground (`python -m pipeline.serve`): its API in-process (each mode streamed and equal to
the library's decoding, stop, several requests at once, the limits, every bad request), its
command line (a missing checkpoint, a port in use, a warning when exposed), and one end-to-end
test in a real headless Chromium."""

import collections
import http.client
import json
import os
import shutil
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO, assert_clean_error, stage_error

from pipeline import serve as serve_tool
from pipeline.core.common import PipelineError
from pipeline.core.params import Evaluate
from pipeline.data.tokenizer import Tokenizer
from pipeline.decoding.answer import answer
from pipeline.decoding.decode import Decoding, generate
from pipeline.model.weights import load_model
from pipeline.serving import engine as engine_module
from pipeline.serving.app import Access, Limits, Playground, create_app
from pipeline.serving.card import model_card
from pipeline.serving.engine import Engine, Request

starlette_testclient = pytest.importorskip("starlette.testclient", reason="the [serve] extra is not installed")
starlette_datastructures = pytest.importorskip("starlette.datastructures")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

SENTENCES = [
    "Jesus wept.",
    "Blessed are the meek: for they shall inherit the earth.",
    "Кто прослезился?",
    "资源类型是什么?",
]


class Served:
    """A model, its tokenizer, an engine and the app over them (engine closed at the end)."""

    def __init__(self, folder: Path, limits: Limits | None = None, token: str | None = None, **engine):
        self.folder = folder
        self.tok = Tokenizer(folder / "data/tokens/tokenizer.model")
        self.model = load_model(folder / "data/model/best.safetensors", self.tok)
        self.engine = Engine(self.model, self.tok, **engine)
        card = model_card(folder / "data/model/best.safetensors", self.tok, folder / "metrics")
        access = Access(hosts=frozenset({"testserver", "localhost"}), token=token)  # the test client's Host
        self.app = create_app(self.model, self.tok, self.engine, card, limits, access)
        self.client = starlette_testclient.TestClient(self.app)

    def events(self, body: dict) -> list[tuple[str, dict]]:
        with self.client.stream("POST", "/api/generate", json=body) as r:
            assert r.status_code == 200, r.read()
            return parse_events(r.iter_text())

    def text(self, body: dict) -> str:
        events = self.events(body)
        assert events[0][0] == "start" and events[-1][0] == "done", events
        return "".join(data["text"] for name, data in events if name == "token")

    def error(self, status: int, **request) -> str:
        if "content" in request and "headers" not in request:  # raw bytes, sent as JSON unless the case says
            request["headers"] = {"Content-Type": "application/json"}
        r = self.client.request(request.pop("method", "POST"), request.pop("path", "/api/generate"), **request)
        assert r.status_code == status, (r.status_code, r.text)
        message = r.json()["error"]
        assert message and "\n" not in message and "Traceback" not in message
        return message


def parse_events(chunks) -> list[tuple[str, dict]]:
    events, buffer = [], ""
    for chunk in chunks:
        buffer += chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((fields["event"], json.loads(fields["data"])))
    return events


@pytest.fixture(scope="module")
def served(answered):
    s = Served(answered)
    yield s
    s.engine.close()


@pytest.fixture
def gate(monkeypatch):
    """Hold every batch before its step once `n` tokens are written, until released: a request
    is then surely still decoding when the test acts on it."""
    release, state = threading.Event(), {"n": 3}
    step = engine_module.Wave.step

    def held(wave):
        if wave.batch.n >= state["n"]:
            release.wait(timeout=30)
        return step(wave)

    monkeypatch.setattr(engine_module.Wave, "step", held)
    yield release
    release.set()


def test_the_card_tells_what_the_model_is_and_how_it_scored(served):
    info = served.client.get("/api/info").json()
    assert info["directions"] == ["ru"] and info["answers_questions"] is True
    assert info["parameters"] > 0 and info["model"]["arch"] == "gpt" and info["metrics_of_this_model"] is True
    metrics = info["metrics"]
    assert metrics["bits_per_byte"]["bits_per_byte"] < metrics["bits_per_byte"]["unigram_bits_per_byte"]
    assert [t["source"] for t in metrics["translation"]] == ["pairs"]
    assert {"who_says", "quiz"} <= {q["group"] for q in metrics["qa"]}
    assert info["curves"]["train"] and info["curves"]["val"]
    assert info["limits"] == {"max_text_bytes": 8192, "max_new_tokens": 256, "max_beam_size": 8}


def test_the_sampling_defaults_are_evaluates_here_and_in_generate(served):
    """One declaration (pipeline.core.params.Evaluate): evaluate's samples, the playground's continue
    mode (the page reads each mode's defaults from /api/info) and `python -m pipeline.generate`."""
    from pipeline.generate import parser

    e, defaults = Evaluate(), served.client.get("/api/info").json()["defaults"]
    sampling = {k: v for k, v in e.sampling().items() if k != "seed"}  # the seed: not a request's setting
    assert {k: defaults["continue"][k] for k in sampling} == sampling
    assert defaults["continue"]["max_new_tokens"] == min(e.sample_tokens, Limits().max_new_tokens)
    for mode in ("translate", "ask"):
        assert defaults[mode]["temperature"] == 0 and defaults[mode]["beam_size"] == 1, mode
    playground = Playground(served.model, served.tok, served.engine, {}, Limits())
    assert playground.decoding({"mode": "continue"}) == Decoding(min(e.sample_tokens, 256), **e.sampling())
    args = parser().parse_args(["ROMEO:"])  # temperature: the command's own None, evaluate's when sampling
    assert {k: getattr(args, k) for k in ("top_k", "top_p", "repetition_penalty", "seed")} == {
        k: getattr(e, k) for k in ("top_k", "top_p", "repetition_penalty", "seed")
    }


def test_a_model_not_yet_evaluated_says_so(answered, tmp_path):
    tok = Tokenizer(answered / "data/tokens/tokenizer.model")
    card = model_card(answered / "data/model/best.safetensors", tok, tmp_path)
    assert card["metrics"] is None and card["train"] is None and card["curves"] == {"train": [], "val": []}


@pytest.mark.parametrize("text", SENTENCES)
def test_each_mode_streams_what_the_library_decodes(served, text):
    """Streamed greedy text == pipeline.decoding's for the same prompt (continue, translate, ask;
    English, Russian, Chinese), and beam search == generate's beam search."""
    tok, model = served.tok, served.model
    ids = tok.encode([text])[0]
    greedy = Decoding(40)
    (cont,) = generate(model, [[tok.eos_id, *ids]], tok.eos_id, greedy)
    assert served.text({"mode": "continue", "text": text, "temperature": 0, "max_new_tokens": 40}) == tok.decode(cont)
    (trans,) = generate(model, [tok.pair_prompt(ids, "ru")], tok.eos_id, greedy)
    assert served.text({"mode": "translate", "text": text, "max_new_tokens": 40}) == tok.decode(trans)
    beam = Decoding(40, beam_size=3, length_penalty=1.2)
    (best,) = generate(model, [tok.pair_prompt(ids, "ru")], tok.eos_id, beam)
    body = {"mode": "translate", "text": text, "to": "ru", "max_new_tokens": 40, "beam_size": 3, "length_penalty": 1.2}
    assert served.text(body) == tok.decode(best)
    (reply,) = answer(model, tok, [text], Decoding(32), 1, "cpu")
    assert served.text({"mode": "ask", "text": text}) == reply


def test_sampling_streams_whole_characters_within_the_limit(served):
    tok, events, finished = served.tok, [], threading.Event()

    def sink(event):
        events.append(event)
        if event["event"] in ("done", "error"):
            finished.set()

    ids = tok.encode(["资源"])[0]
    job = served.engine.submit(Request([tok.eos_id, *ids], Decoding(30, temperature=1.0, top_p=0.9, seed=3)), sink)
    assert finished.wait(timeout=60)
    tokens = [e["text"] for e in events if e["event"] == "token"]
    assert events[-1]["event"] == "done" and events[-1]["tokens"] == len(job.ids) <= 30
    assert "".join(tokens) == tok.decode(job.ids)
    assert not any(t.endswith("\ufffd") for t in tokens[:-1])  # (only what the model ends on may be cut)


class Streams:
    """Requests submitted to an engine directly, each stream's text gathered; `waves` counts the
    batches the engine starts (and how many requests each starts with)."""

    def __init__(self, engine, monkeypatch):
        self.engine, self.got, self.finished, self.waves = engine, [], threading.Semaphore(0), []
        start = engine_module.Wave.__init__

        def counted(wave, model, jobs, *args):
            self.waves.append(len(jobs))
            start(wave, model, jobs, *args)

        monkeypatch.setattr(engine_module.Wave, "__init__", counted)

    def submit(self, prompt: list[int], decoding: Decoding) -> None:
        texts = []
        self.got.append(texts)

        def sink(event):
            if event["event"] == "token":
                texts.append(event["text"])
            elif event["event"] in ("done", "error"):
                assert event["event"] == "done", event
                self.finished.release()

        self.engine.submit(Request(prompt, decoding), sink)

    def texts(self) -> list[str]:
        for _ in self.got:
            assert self.finished.acquire(timeout=60)
        return ["".join(t) for t in self.got]


def test_requests_at_once_decode_together_each_as_alone(served, monkeypatch):
    """Prompts of different lengths and modes, queued while the engine waits, start as one batch;
    each stream equals the request decoded alone."""
    tok, engine = served.tok, served.engine
    prompts = [[tok.eos_id, *ids] for ids in tok.encode(SENTENCES)]
    prompts += [tok.pair_prompt(ids, "ru") for ids in tok.encode(SENTENCES)]
    alone = [generate(served.model, [p], tok.eos_id, Decoding(30))[0] for p in prompts]
    streams = Streams(engine, monkeypatch)
    with engine.lock:  # the engine takes them all at once
        for p in prompts:
            streams.submit(p, Decoding(30))
    assert streams.texts() == [tok.decode(a) for a in alone]
    assert streams.waves == [len(prompts)]


def test_requests_that_arrive_while_others_decode_join_their_batch(served, gate, monkeypatch):
    """Continuous batching: a request decodes (held at its third token); three more arrive, join
    its batch at the next step, and each stream equals its prompt decoded alone."""
    tok, engine = served.tok, served.engine
    texts = ["Blessed are the meek: for they shall inherit the earth.", "Jesus wept.", "Кто прослезился?", "资源"]
    prompts = [[tok.eos_id, *ids] for ids in tok.encode(texts)]
    limits = [40, 20, 25, 30]
    alone = [generate(served.model, [p], tok.eos_id, Decoding(n))[0] for p, n in zip(prompts, limits)]
    assert len(alone[0]) > 5  # (still decoding when the others arrive)
    streams = Streams(engine, monkeypatch)
    streams.submit(prompts[0], Decoding(limits[0]))
    deadline = time.monotonic() + 30
    while not (engine.waves and engine.waves[0].batch.n >= 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    for p, n in zip(prompts[1:], limits[1:]):
        streams.submit(p, Decoding(n))
    gate.set()
    assert streams.texts() == [tok.decode(a) for a in alone]
    assert streams.waves == [1]  # one batch: the three joined it


def test_a_beam_search_advances_a_step_at_a_time_beside_the_streams(served, monkeypatch):
    """A beam search and a stream admitted together: the beam search is a wave like the others, so
    the stream writes its tokens while the beams decode (it waited for the whole search before),
    and each gives what it gives alone."""
    tok, engine = served.tok, served.engine
    prompts = [tok.pair_prompt(ids, "ru") for ids in tok.encode(SENTENCES[1:3])]
    beam, greedy = Decoding(40, beam_size=4), Decoding(40)
    alone = [
        generate(served.model, [prompts[0]], tok.eos_id, beam)[0],
        generate(served.model, [prompts[1]], tok.eos_id, greedy)[0],
    ]
    seen_at_beam_done = []
    streams = Streams(engine, monkeypatch)
    with engine.lock:  # admitted together: the beam search first
        streams.submit(prompts[0], beam)
        streams.submit(prompts[1], greedy)
        streamed = engine.pending[1]
        sink = engine.pending[0].sink

        def watched(event):
            if event["event"] == "done":
                seen_at_beam_done.append((len(streamed.ids), streamed.finished))
            sink(event)

        engine.pending[0].sink = watched
    assert streams.texts() == [tok.decode(a) for a in alone]
    assert streams.waves == [1, 1]
    tokens, finished = seen_at_beam_done[0]
    assert tokens > 0 or finished  # the stream went on while the beams decoded


def test_stop_ends_the_decoding_on_the_server(served, gate):
    with served.client.stream("POST", "/api/generate", json={"mode": "continue", "text": "ROMEO:"}) as r:
        lines = r.iter_lines()
        first = [next(lines), next(lines)]
        job_id = json.loads(first[1].removeprefix("data: "))["id"]
        assert served.client.post("/api/stop", json={"id": job_id}).json() == {"stopped": True}
        gate.set()
        events = parse_events(["\n".join(first) + "\n" + "\n".join(lines) + "\n"])
    name, data = events[-1]
    assert name == "done" and data["reason"] == "stopped" and data["tokens"] < 200
    assert served.client.post("/api/stop", json={"id": job_id}).json() == {"stopped": False}
    assert served.engine.load == {"decoding": 0, "waiting": 0}


def test_a_full_queue_says_busy_and_the_server_goes_on(answered, gate):
    s = Served(answered, max_rows=1, max_queue=1)
    try:
        done = []
        first = s.engine.submit(Request([s.tok.eos_id], Decoding(100)), done.append)
        deadline = time.monotonic() + 30
        while s.engine.load["decoding"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        s.engine.submit(Request([s.tok.eos_id], Decoding(5)), done.append)  # waits: no room
        assert "busy" in s.error(503, json={"mode": "continue", "text": "ROMEO:"})
        s.engine.stop(first.id)
        gate.set()
        while sum(e["event"] == "done" for e in done) < 2 and time.monotonic() < deadline + 30:
            time.sleep(0.01)  # the queue drains (the waiting request decodes), then there is room again
        assert s.events({"mode": "continue", "text": "ROMEO:", "max_new_tokens": 5})[-1][0] == "done"
    finally:
        s.engine.close()


BAD_REQUESTS = [
    ({"content": b"{'mode': 1"}, 400, "malformed JSON"),
    ({"content": b"\xff\xfe"}, 400, "malformed JSON"),
    ({"json": ["continue"]}, 400, "JSON object"),
    ({"json": {"mode": "sing", "text": "x"}}, 400, "mode"),
    ({"json": {"mode": "continue"}}, 400, "text: empty"),
    ({"json": {"mode": "continue", "text": "x", "file": "/etc/passwd"}}, 400, "unknown field 'file'"),
    ({"json": {"mode": "continue", "text": "x", "checkpoint": "a"}}, 400, "unknown field 'checkpoint'"),
    ({"json": {"mode": "continue", "text": 5}}, 400, "text: must be str"),
    ({"json": {"mode": "continue", "text": "x", "top_k": 2.5}}, 400, "top_k: must be int"),
    ({"json": {"mode": "continue", "text": "x", "beam_size": True}}, 400, "beam_size"),
    ({"content": b'{"mode": "continue", "text": "x", "temperature": NaN}'}, 400, "temperature: must be a finite"),
    ({"json": {"mode": "continue", "text": "x", "temperature": -1}}, 400, "temperature"),
    ({"json": {"mode": "continue", "text": "x", "top_p": 0}}, 400, "top_p"),
    ({"json": {"mode": "continue", "text": "x", "max_new_tokens": 257}}, 400, "server's cap"),
    ({"json": {"mode": "continue", "text": "x", "max_new_tokens": 0}}, 400, "max_new_tokens"),
    ({"json": {"mode": "translate", "text": "x", "beam_size": 9}}, 400, "beam_size: must be 1 to 8"),
    ({"json": {"mode": "translate", "text": "x", "beam_size": 0}}, 400, "beam_size"),
    ({"json": {"mode": "translate", "text": "x", "to": "fr"}}, 400, "unknown direction 'fr'"),
    ({"json": {"mode": "continue", "text": "x", "to": "ru"}}, 400, "to: only to translate"),
    ({"json": {"mode": "continue", "text": "x", "context": "y"}}, 400, "context: only"),
    ({"json": {"mode": "ask", "text": " "}}, 400, "text: empty"),
    ({"json": {"mode": "continue", "text": "я" * 4097}}, 413, "text: 8194 bytes"),
    ({"json": {"mode": "ask", "text": "?", "context": "字" * 3000}}, 413, "context: 9000 bytes"),
    ({"content": b'{"mode": "continue", "text": "\\ud800"}'}, 400, "not valid Unicode"),
    ({"content": b"x" * 70000}, 413, "limit of 65536"),
    ({"path": "/api/stop", "json": {"id": 3}}, 400, '"id"'),
    ({"path": "/api/stop", "content": b"{"}, 400, "malformed JSON"),
    ({"path": "/etc/passwd", "method": "GET"}, 404, "Not Found"),
    ({"path": "/../pipeline/serve.py", "method": "GET"}, 404, "Not Found"),
    ({"path": "/api/generate", "method": "GET"}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("request_, status, needle", BAD_REQUESTS, ids=[b[2] for b in BAD_REQUESTS])
def test_every_bad_request_gets_one_line_and_the_server_goes_on(served, request_, status, needle):
    assert needle in served.error(status, **dict(request_))
    assert served.events({"mode": "translate", "text": "Jesus wept.", "max_new_tokens": 3})[-1][0] == "done"


ASK = {"mode": "continue", "text": "ROMEO:", "max_new_tokens": 3}
JSON = {"Content-Type": "application/json"}
HOSTILE = [
    # another site's page: a "simple" request a browser sends without asking first, or a preflighted one
    ({"content": json.dumps(ASK), "headers": {"Content-Type": "text/plain"}}, 415, "send application/json"),
    ({"content": json.dumps(ASK), "headers": {}}, 415, "send application/json"),
    (
        {"content": json.dumps(ASK), "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        415,
        "Content-Type",
    ),
    ({"json": ASK, "headers": {"Origin": "http://evil.example"}}, 403, "Origin 'http://evil.example'"),
    ({"json": ASK, "headers": {"Origin": "null"}}, 403, "Origin 'null'"),
    ({"json": ASK, "headers": {"Origin": "http://testserver.evil.example"}}, 403, "Origin"),
    ({"path": "/api/stop", "json": {"id": "x"}, "headers": {"Origin": "http://evil.example"}}, 403, "Origin"),
    # DNS rebinding: another name that resolves to this machine
    ({"json": ASK, "headers": {"Host": "evil.example:8000"}}, 403, "Host 'evil.example:8000'"),
    ({"path": "/api/info", "method": "GET", "headers": {"Host": "evil.example"}}, 403, "not this server's"),
    ({"path": "/", "method": "GET", "headers": {"Host": "127.0.0.1.evil.example"}}, 403, "Host"),
    ({"path": "/api/info", "method": "GET", "headers": {"Host": "localhost:x"}}, 403, "Host 'localhost:x'"),
    # encodings
    (
        {"content": json.dumps(ASK).encode("utf-16"), "headers": {"Content-Type": "application/json; charset=utf-16"}},
        415,
        "UTF-8",
    ),
    ({"content": b"\x1f\x8b", "headers": {**JSON, "Content-Encoding": "gzip"}}, 415, "Content-Encoding 'gzip'"),
    ({"content": b"\xff\xfe"}, 400, "malformed JSON"),
    # nesting, numbers, sizes
    ({"content": b"[" * 60000}, 400, "nested 60000 deep, more than the limit of 8"),
    ({"content": b"{" * 30000}, 400, "nested 30000 deep"),
    ({"content": b'{"mode": "continue", "text": "x", "top_k": [[[[[[[[[1]]]]]]]]]}'}, 400, "nested 10 deep"),
    ({"content": b'{"mode": "continue", "text": "x", "temperature": 1e999}'}, 400, "temperature: must be a finite"),
    ({"content": b'{"mode": "continue", "text": "x", "temperature": -Infinity}'}, 400, "temperature: must be a finite"),
    ({"content": b'{"mode": "continue", "text": "x", "max_new_tokens": 1' + b"0" * 400 + b"}"}, 400, "server's cap"),
    ({"content": b'{"mode": "continue", "text": "x", "top_k": 1.5e3}'}, 400, "top_k: must be int"),
    ({"content": (b"[" * 40000) + b"]" * 40000}, 413, "limit of 65536"),
    ({"content": iter([b'{"mode": "continue", "text": "', b"x" * 40000, b"x" * 40000, b'"}'])}, 413, "over the limit"),
    # methods
    ({"method": "PUT", "json": ASK}, 405, "Method Not Allowed"),
    ({"method": "DELETE"}, 405, "Method Not Allowed"),
    ({"method": "PATCH", "path": "/api/stop", "json": {"id": "x"}}, 405, "Method Not Allowed"),
    ({"method": "TRACE", "path": "/"}, 405, "Method Not Allowed"),
    ({"method": "POST", "path": "/api/info", "json": {}}, 405, "Method Not Allowed"),
    ({"method": "GET", "path": "/%2e%2e/pipeline/serve.py"}, 404, "Not Found"),
    ({"method": "GET", "path": "/api/..%2fapp.py"}, 404, "Not Found"),
]


@pytest.mark.parametrize("request_, status, needle", HOSTILE, ids=[h[2] for h in HOSTILE])
def test_hostile_requests_are_refused_in_one_line_with_nothing_decoded(served, monkeypatch, request_, status, needle):
    submitted = []

    def submit(*args):  # a request that got through: said at once, not a stream that never ends
        submitted.append(args)
        raise engine_module.Busy("decoding was asked for")

    monkeypatch.setattr(served.engine, "submit", submit)
    assert needle in served.error(status, **dict(request_))
    assert not submitted
    monkeypatch.undo()
    assert served.events({"mode": "translate", "text": "Jesus wept.", "max_new_tokens": 3})[-1][0] == "done"


def test_what_a_browser_sends_from_the_page_itself_is_served(served):
    """Its own origin, JSON with a charset, brackets inside strings (not nesting), the page's GETs."""
    own = {"Origin": "http://testserver", "Content-Type": "application/json; charset=UTF-8"}
    body = json.dumps({"mode": "continue", "text": '[[[[[[[[[[{{{{{{{{{{ \\" [[[', "max_new_tokens": 3})
    with served.client.stream("POST", "/api/generate", content=body, headers=own) as r:
        assert r.status_code == 200, r.read()
        assert parse_events(r.iter_text())[-1][0] == "done"
    assert served.client.get("/", headers={"Host": "localhost"}).status_code == 200
    assert served.client.post("/api/stop", json={"id": "x"}, headers={"Origin": "http://testserver"}).status_code == 200


def test_request_ids_are_unguessable_so_no_one_stops_another_users_request(served, gate):
    other = served.engine.submit(Request([served.tok.eos_id], Decoding(50)), lambda event: None)
    mine = served.engine.submit(Request([served.tok.eos_id], Decoding(5)), lambda event: None)
    assert (
        len(other.id) >= 16
        and other.id != mine.id
        and not set(other.id) - set(string.ascii_letters + string.digits + "-_")
    )
    near = mine.id[:-1] + ("y" if mine.id.endswith("x") else "x")  # one character off (ids are random)
    for guess in ("r1", "r2", near, ""):
        assert served.client.post("/api/stop", json={"id": guess}).json() == {"stopped": False}
    assert served.engine.jobs[other.id].stopped is False
    served.engine.stop(other.id)
    served.engine.stop(mine.id)
    gate.set()


def test_a_token_is_asked_on_every_api_call_where_the_server_has_one(answered):
    s = Served(answered, token="s3cret-token")
    try:
        assert s.client.get("/").status_code == 200  # the page itself: it reads the token from its URL
        assert "no valid token" in s.error(401, path="/api/info", method="GET")
        assert "no valid token" in s.error(
            401, path="/api/info", method="GET", headers={"Authorization": "Bearer nope"}
        )
        assert "no valid token" in s.error(401, json=ASK, headers={"Authorization": "s3cret-token"})
        assert "no valid token" in s.error(401, path="/api/stop", json={"id": "x"})
        auth = {"Authorization": "Bearer s3cret-token"}
        assert s.client.get("/api/info", headers=auth).json()["directions"] == ["ru"]
        with s.client.stream("POST", "/api/generate", json=ASK, headers=auth) as r:
            assert r.status_code == 200 and parse_events(r.iter_text())[-1][0] == "done"
    finally:
        s.engine.close()


def test_the_server_knows_its_own_names_and_asks_for_a_token_beyond_loopback():
    local = Access.serving("127.0.0.1", 8000)
    assert local.token is None and local.hosts == {"localhost", "127.0.0.1", "[::1]"} and local.port == 8000
    assert Access.serving("::1", 8000).token is None
    assert Access.serving("127.0.0.1", 8000, require_token=True).token
    wide = Access.serving("0.0.0.0", 8000, allow=("lab.example", "fe80::1"))
    assert wide.token and len(wide.token) >= 32 and {"0.0.0.0", "lab.example", "[fe80::1]"} <= wide.hosts
    headers = starlette_datastructures.Headers
    assert local.refusal("GET", "/api/info", headers({"host": "127.0.0.1:8000"})) is None
    assert local.refusal("GET", "/api/info", headers({"host": "LOCALHOST:8000"})) is None
    assert local.refusal("GET", "/api/info", headers({"host": "[::1]:8000"})) is None
    assert local.refusal("GET", "/api/info", headers({"host": "127.0.0.1:8001"}))[0] == 403  # another port
    assert local.refusal("GET", "/api/info", headers({"host": "127.0.0.1"}))[0] == 403  # port 80
    assert local.refusal("GET", "/api/info", headers({}))[0] == 400
    assert wide.refusal("GET", "/", headers({"host": "lab.example:8000"})) is None
    assert wide.refusal("GET", "/api/info", headers({"host": "lab.example:8000"}))[0] == 401


def test_no_cors_opening(served):
    r = served.client.options("/api/generate", headers={"Origin": "https://example.com"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    r = served.client.get("/api/info", headers={"Origin": "https://example.com"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


def test_asking_a_model_without_qa_is_refused(finished):
    s = Served(finished)
    try:
        assert "not trained to answer questions" in s.error(400, json={"mode": "ask", "text": "Who?"})
        assert s.client.get("/api/info").json()["answers_questions"] is False
    finally:
        s.engine.close()


# --- the command line -----------------------------------------------------------------------


def serve(cwd: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.serve", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        **kw,
    )


def test_a_missing_checkpoint_or_a_port_in_use_is_one_line(answered, tmp_path):
    stage_error("serve", tmp_path, "tokenizer missing", args=("--port", "0"))
    tokenizer = str(answered / "data/tokens/tokenizer.model")
    stage_error("serve", tmp_path, "no checkpoint", args=("--tokenizer", tokenizer))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = serve(answered, "--port", str(port))
        out, err = proc.communicate(timeout=120)
    assert_clean_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), f"--port {port}", "in use")


@contextmanager
def running(folder: Path, *args: str):
    """`python -m pipeline.serve` on a free port: yields its URL and the process."""
    proc = serve(folder, "--port", "0", *args)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        yield line.split(" at ", 1)[1].split()[0], proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_exposing_it_warns_and_the_default_is_this_machine_only(answered):
    assert serve_tool.parser().parse_args([]).host == "127.0.0.1"  # (the browser test serves at the default)
    with running(answered, "--host", "0.0.0.0") as (url, proc):
        parts = urllib.parse.urlsplit(url)
        token = urllib.parse.parse_qs(parts.query)["token"][0]
        conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=30)  # this machine only
        for headers, status in (
            ({}, 401),
            ({"Authorization": f"Bearer {token}x"}, 401),
            ({"Authorization": f"Bearer {token}"}, 200),
        ):
            conn.request("GET", "/api/info", headers=headers)
            r = conn.getresponse()
            assert r.status == status, (r.status, headers)
            assert ("no valid token" in json.loads(r.read())["error"]) if status == 401 else r.read()
        conn.close()
        proc.terminate()
        assert "warning: listening on 0.0.0.0" in proc.stderr.read()


def raw(address: tuple[str, int], request: bytes, timeout: float = 60) -> tuple[int, str]:
    """Send bytes as they are (headers no client would send) and read the whole answer."""
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def post(address: tuple[str, int], body: dict, headers: dict | None = None, timeout: float = 120):
    """A POST to /api/generate: (status, the events, or the error's line)."""
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read().decode()
        return r.status, parse_events([data]) if r.status == 200 else json.loads(data)["error"]
    finally:
        conn.close()


def test_the_running_server_refuses_other_hosts_and_origins_and_outlives_abuse(answered):
    """python -m pipeline.serve on 127.0.0.1, over real sockets: the rebinding and cross-origin
    requests, headers no client library sends, 300 idle half-open connections, a client that reads
    nothing, one that leaves mid-stream, 150 streams at once; nothing decoded for a refusal, no 5xx,
    no traceback in the server's log."""
    with running(answered, "--max-queue", "32", "--max-rows", "8") as (url, proc):
        address = ("127.0.0.1", urllib.parse.urlsplit(url).port)
        own = f"127.0.0.1:{address[1]}"
        ask = json.dumps(ASK).encode()

        def request(head: str, body: bytes = b"") -> tuple[int, str]:
            return raw(address, head.replace("\n", "\r\n").encode() + b"\r\n" + body)

        status, body = request(f"GET /api/info HTTP/1.1\nHost: evil.example:{address[1]}\nConnection: close\n")
        assert status == 403 and "not this server's" in json.loads(body)["error"]
        status, body = request(
            f"POST /api/generate HTTP/1.1\nHost: {own}\nOrigin: http://evil.example\nContent-Type: text/plain\n"
            f"Content-Length: {len(ask)}\nConnection: close\n",
            ask,
        )
        assert status == 403 and "Origin 'http://evil.example'" in json.loads(body)["error"]
        assert request("GET /api/info HTTP/1.0\n")[0] == 400  # no Host at all
        status, body = request(f"GET /api/info HTTP/1.1\nHost: {own}\nHost: evil.example\nConnection: close\n")
        assert status == 400
        status, body = request(
            f"POST /api/generate HTTP/1.1\nHost: {own}\nContent-Type: application/json\n"
            "Content-Length: 5\nContent-Length: 7\nConnection: close\n",
            ask,
        )
        assert status == 400  # refused by the HTTP parser, before the app
        for absurd, refused in (("9" * 30, 400), (str(10**12), 413)):  # past the parser's reach / a terabyte
            status, body = request(
                f"POST /api/generate HTTP/1.1\nHost: {own}\nContent-Type: application/json\n"
                f"Content-Length: {absurd}\nConnection: close\n",
                ask,
            )
            assert status == refused and (refused == 400 or "more than the limit" in json.loads(body)["error"])
        status, body = request(
            f"POST /api/generate HTTP/1.1\nHost: {own}\nContent-Type: application/json\n"
            f"Content-Length: 60000\nConnection: close\n",
            b"[" * 60000,
        )
        assert status == 400 and "nested 60000 deep" in json.loads(body)["error"]

        idle = []  # 300 connections that send half a request and wait
        try:
            for _ in range(300):
                conn = socket.create_connection(address, timeout=30)
                conn.sendall(f"POST /api/generate HTTP/1.1\r\nHost: {own}\r\nContent-Le".encode())
                idle.append(conn)
            status, events = post(address, {"mode": "translate", "text": "Jesus wept.", "max_new_tokens": 3})
            assert status == 200 and events[-1][0] == "done"
        finally:
            for conn in idle:
                conn.close()

        silent = socket.create_connection(address, timeout=30)  # asks for a long stream, reads nothing
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        long = json.dumps({"mode": "continue", "text": "ROMEO:", "max_new_tokens": 256}).encode()
        silent.sendall(
            f"POST /api/generate HTTP/1.1\r\nHost: {own}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(long)}\r\n\r\n".encode()
            + long
        )
        leaver = http.client.HTTPConnection(*address, timeout=60)  # reads the start event, then goes
        leaver.request("POST", "/api/generate", long, {"Content-Type": "application/json"})
        assert leaver.getresponse().readline().startswith(b"event: start")
        leaver.close()

        with ThreadPoolExecutor(150) as pool:  # 150 streams at once: each answered, or told busy
            answers = list(pool.map(lambda i: post(address, {**ASK, "text": f"ROMEO {i}:"}), range(150)))
        statuses = collections.Counter(status for status, _ in answers)
        assert set(statuses) <= {200, 503} and statuses[200] > 0, statuses
        assert all(events[-1][0] == "done" for status, events in answers if status == 200)
        silent.close()

        def load() -> dict:
            conn = http.client.HTTPConnection(*address, timeout=30)
            conn.request("GET", "/api/info")
            return json.loads(conn.getresponse().read())["load"]

        deadline = time.monotonic() + 120
        while load() != {"decoding": 0, "waiting": 0} and time.monotonic() < deadline:
            time.sleep(0.1)  # the rows of the clients that went away are freed
        assert load() == {"decoding": 0, "waiting": 0}
        proc.terminate()
        log = proc.stderr.read()
    assert "Traceback" not in log and "Exception" not in log, log


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_the_page_in_a_real_browser(answered, tmp_path):
    """Headless Chromium, the server asking for a token (as beyond loopback): the page opened
    without it says so; with the URL the server printed, type a prompt, see text stream in and end; translate.
    Saves a screenshot (to $LMPIPE_SCREENSHOT too, where set). The README's:
    LMPIPE_PLAYGROUND_PROJECT=. LMPIPE_SCREENSHOT=docs/playground.png pytest tests/serving/test_serve.py -k browser"""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    folder = os.environ.get("LMPIPE_PLAYGROUND_PROJECT") or answered  # the README's: the repository's model
    with running(Path(folder), "--token") as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[*flags, "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        assert url.startswith("http://127.0.0.1:") and "/?token=" in url
        page.goto(url.split("?")[0])  # without the token: the page says so, and nothing is served
        page.wait_for_function("document.querySelector('#status').textContent.includes('no valid token')")
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        assert "not been evaluated" not in page.inner_text("#metrics")
        page.fill("#text", "HELENA.")
        page.fill("#temperature", "0.7")
        page.click("#run")
        page.wait_for_function("document.querySelector('#generated').textContent.length > 0")
        page.wait_for_function("!document.querySelector('#run').disabled")  # the stream ended
        assert "tokens in" in page.inner_text("#status"), page.inner_text("#output")
        assert page.inner_text("#generated")
        page.click("button[data-mode=translate]")
        page.fill("#text", "Jesus wept.")
        page.click("#run")
        page.wait_for_function(
            "!document.querySelector('#run').disabled && document.querySelector('#status').textContent"
        )
        assert "tokens in" in page.inner_text("#status") and page.inner_text("#generated").strip()
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        if os.environ.get("LMPIPE_SCREENSHOT"):
            shutil.copy(tmp_path / "playground.png", os.environ["LMPIPE_SCREENSHOT"])
        browser.close()


def test_without_the_serve_extra_it_says_which_to_install(monkeypatch, answered):
    monkeypatch.setattr(serve_tool.web, "MISSING", "starlette")
    with pytest.raises(
        PipelineError, match=r'the \[serve\] extra \(starlette is not installed\): pip install -e ".\[serve\]"'
    ):
        serve_tool.main(["--checkpoint", str(answered / "data/model/best.safetensors")])
