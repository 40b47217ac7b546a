"""The playground (`python -m pipeline.serve`): its API in-process (each mode streamed and equal to
the library's decoding, stop, several requests at once, the limits, every bad request), its
command line (a missing checkpoint, a port in use, a warning when exposed), and one end-to-end
test in a real headless Chromium."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO, assert_clean_error, stage_error

from pipeline import serve as serve_tool
from pipeline.core.common import PipelineError
from pipeline.data.tokenizer import Tokenizer
from pipeline.decoding.answer import answer
from pipeline.decoding.decode import Decoding, generate
from pipeline.model.weights import load_model
from pipeline.serving import engine as engine_module
from pipeline.serving.app import Limits, create_app
from pipeline.serving.card import model_card
from pipeline.serving.engine import Engine, Request

starlette_testclient = pytest.importorskip("starlette.testclient", reason="the [serve] extra is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

SENTENCES = [
    "Jesus wept.",
    "Blessed are the meek: for they shall inherit the earth.",
    "Кто прослезился?",
    "资源类型是什么?",
]


class Served:
    """A model, its tokenizer, an engine and the app over them (engine closed at the end)."""

    def __init__(self, folder: Path, limits: Limits | None = None, **engine):
        self.folder = folder
        self.tok = Tokenizer(folder / "data/tokens/tokenizer.model")
        self.model = load_model(folder / "data/model/best.safetensors", self.tok)
        self.engine = Engine(self.model, self.tok, **engine)
        card = model_card(folder / "data/model/best.safetensors", self.tok, folder / "metrics")
        self.app = create_app(self.model, self.tok, self.engine, card, limits)
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
        proc.terminate()
        assert "warning: listening on 0.0.0.0" in proc.stderr.read()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_the_page_in_a_real_browser(answered, tmp_path):
    """Headless Chromium: type a prompt, see text stream in and end; translate.
    Saves a screenshot (to $LMPIPE_SCREENSHOT too, where set). The README's:
    LMPIPE_PLAYGROUND_PROJECT=. LMPIPE_SCREENSHOT=docs/playground.png pytest tests/test_serve.py -k browser"""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    folder = os.environ.get("LMPIPE_PLAYGROUND_PROJECT") or answered  # the README's: the repository's model
    with running(Path(folder)) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[*flags, "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        assert url.startswith("http://127.0.0.1:")
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
