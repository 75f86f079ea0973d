"""``blockdiff serve --speculative``: every request decoded by lossless speculative decoding (serving/speculative.py),
with the verifier and drafter ``modeling/speculative.py`` picks for the path, as ``blockdiff sample --speculative``.

Two servers on free localhost ports, both in float64 (no argmax near-tie can flip, so greedy identity is exact): a
plain decoder verifying ``lookup`` drafts, and a tiny block-diffusion model drafting (``two_model``) for its base. The
tiny decoder's weights are drawn with std 0.5, so its greedy text is not a run of one character and the drafts are
both kept and rejected. No timing is asserted.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from conftest import idle_stats, write_tiny_model_dir  # noqa: E402

from blockdiff.errors import UsageError  # noqa: E402
from blockdiff.serving import build_engine  # noqa: E402
from blockdiff.serving.app import create_app  # noqa: E402
from blockdiff.serving.deltas import TextDeltas  # noqa: E402
from blockdiff.serving.engine import Engine  # noqa: E402

PLAIN, BLOCK = "plain", "block"
PROMPTS = ["the cat", "abc abc", "Hello there", "x"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """``(model_dir, base_dir)``: a tiny block-diffusion model (byte tokenizer, block length 4, context 32) whose
    decoder weights are redrawn with std 0.5, and that decoder saved as a plain transformers model: its base."""
    from blockdiff.modeling.io import export_model, load_model_dir

    tmp = tmp_path_factory.mktemp("servespec")
    model_dir = write_tiny_model_dir(tmp / "run")
    loaded = load_model_dir(model_dir, lean=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.backbone.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    export_model(loaded.model, loaded.tokenizer, loaded.config, model_dir)
    base = tmp / "base"
    loaded.model.backbone.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
    return model_dir, base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _running(engine):
    """The base URL of a real uvicorn server over ``engine`` in a thread of this process."""
    engine.start()
    uv = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{uv.config.port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        engine.stop()


def _float64(engine):
    for model in (engine.models.model, engine.models.verifier):
        if model is not None:
            model.to(torch.float64)
    return engine


@pytest.fixture(scope="module")
def plain(dirs):
    """``(url, engine)``: the base decoder served with --speculative (default drafter: lookup)."""
    engine = _float64(build_engine(str(dirs[1]), PLAIN, lean=False, speculative=True, max_tokens_limit=64))
    with _running(engine) as url:
        yield url, engine


@pytest.fixture(scope="module")
def block(dirs):
    """``(url, engine)``: the block-diffusion model served with --speculative --base BASE (drafter: two_model)."""
    engine = _float64(build_engine(dirs[0], BLOCK, lean=False, speculative=True, base=str(dirs[1])))
    with _running(engine) as url:
        yield url, engine


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _ids(engine, prompt: str) -> list[int]:
    from blockdiff.sampling import encode_prompts

    return encode_prompts(engine.tokenizer, [prompt])[0]


def _text(engine, tokens: list[int], max_tokens: int) -> str:
    tok = engine.tokenizer
    return TextDeltas(tok, max_tokens, [], {tok.eos_token_id}, None).text(tokens)


def _verifier_greedy(engine, prompt: str, max_tokens: int) -> str:
    """The verifier's own ``generate()`` (greedy), cut like a response."""
    tok, verifier, ids = engine.tokenizer, engine.models.verifier, _ids(engine, prompt)
    out = verifier.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    return _text(engine, out[0, len(ids):].tolist(), max_tokens)


# -- exact: the verifier's own output ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", [PLAIN, BLOCK])
def test_greedy_serve_output_is_the_verifiers_own_greedy_generate(which, request):
    url, engine = request.getfixturevalue(which)
    client, name = _client(url), engine.name
    kept = 0
    for prompt in PROMPTS:
        new = 30 - len(_ids(engine, prompt))  # inside the verifier's 32 positions
        r = client.completions.create(model=name, prompt=prompt, max_tokens=new, temperature=0)
        reference = _verifier_greedy(engine, prompt, new)
        assert len(set(reference)) > 3, "degenerate verifier: the test would prove little"
        assert r.choices[0].text == reference, prompt
        spec = r.usage.model_extra["speculative"]
        assert spec["verifier_forwards"] >= 1 and spec["accepted_tokens"] <= spec["drafted_tokens"]
        assert r.usage.model_extra["nfe"] == spec["verifier_forwards"] + spec["drafter_forwards"]
        assert spec["tokens_per_verifier_forward"] == round(r.usage.completion_tokens / spec["verifier_forwards"], 4)
        assert (spec["drafter_forwards"] > 0) == (which == BLOCK)  # lookup drafts with no network
        kept += spec["accepted_tokens"]
    assert kept > 0, "no draft was ever kept: the drafts were not checked at all"


def test_sampled_serve_output_is_speculative_sampling_with_the_requests_seed(plain):
    """temperature > 0: the text is ``speculative_generate``'s with the request's seed (the draw is exact: its
    distribution is the verifier's, tests/test_lookup.py), and a chat request is decoded the same way."""
    from blockdiff.sampling.speculative import speculative_generate

    url, engine = plain
    client = _client(url)
    r = client.completions.create(model=PLAIN, prompt="the cat", max_tokens=20, temperature=1.0, top_p=0.9, seed=11)
    tok = engine.tokenizer
    out = speculative_generate(engine.models.verifier, None, _ids(engine, "the cat"), drafter="lookup",
                               max_new_tokens=20, temperature=1.0, top_p=0.9, eos_token_id=tok.eos_token_id,
                               generator=torch.Generator().manual_seed(11))
    assert r.choices[0].text == _text(engine, out.new_tokens(0), 20)
    chat = client.chat.completions.create(model=PLAIN, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          temperature=1.0, seed=2)
    assert chat.choices[0].message.role == "assistant" and chat.usage.model_extra["speculative"]["verifier_forwards"]


@pytest.mark.parametrize("which", [PLAIN, BLOCK])
def test_streamed_steps_add_up_to_the_whole_text_one_event_per_verification_step(which, request):
    url, engine = request.getfixturevalue(which)
    client = _client(url)
    kwargs = dict(model=engine.name, prompt="abc abc", max_tokens=20, temperature=1.0, seed=3)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    usage = chunks[-1].usage
    steps = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert len(steps) == usage.model_extra["speculative"]["verifier_forwards"]  # one event per step, none per draft
    assert usage.model_extra["speculative"] == whole.usage.model_extra["speculative"]
    chat = list(client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=8, seed=1, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason in ("stop", "length")


def test_streamed_text_is_detokenised_across_step_boundaries():
    """A step that ends inside a multi-byte character sends the settled part; the pieces add up to the text."""
    from blockdiff.modeling.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    ids = tok("héé wörld ✓ done", add_special_tokens=False)["input_ids"]
    for size in (1, 2, 3):  # steps of 1-3 tokens split every multi-byte character somewhere
        deltas = TextDeltas(tok, 100, [], {tok.eos_token_id}, None)
        pieces = [deltas.block(ids[i: i + size]) for i in range(0, len(ids), size)] + [deltas.finish(ids)]
        assert "".join(pieces) == "héé wörld ✓ done" and all("\ufffd" not in p for p in pieces)


def test_a_stop_string_ends_generation_early(plain):
    url, engine = plain
    client = _client(url)
    whole = client.completions.create(model=PLAIN, prompt="Hello there", max_tokens=18, temperature=0)
    text = whole.choices[0].text
    stop = text[3:5]
    r = client.completions.create(model=PLAIN, prompt="Hello there", max_tokens=18, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < whole.usage.completion_tokens  # stopped, not cut after the fact


def test_cancel_mid_stream_leaves_the_engine_serving_the_next_request(plain, monkeypatch):
    """The client leaves after the first step's event; the verifier's second forward waits until the server has
    cancelled the job (no race: 28 tokens would take at least 4 steps), so the job stops after its first or second
    step, and the next request is served exactly."""
    url, engine = plain
    left, forwards = threading.Event(), []
    cancel = Engine.cancel

    def cancelled(jobs):
        cancel(jobs)
        left.set()

    def gate(module, args, kwargs):
        forwards.append(1)
        if len(forwards) > 1:
            assert left.wait(30), "the server never cancelled the job"

    monkeypatch.setattr(Engine, "cancel", staticmethod(cancelled))
    handle = engine.models.verifier.register_forward_pre_hook(gate, with_kwargs=True)
    before = idle_stats(engine)
    try:
        body = {"model": PLAIN, "prompt": "x", "max_tokens": 28, "stream": True, "temperature": 0}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                next(line for line in r.iter_lines() if line.startswith("data: "))  # one step in, the client leaves
        deadline = time.monotonic() + 30
        while (after := httpx.get(url + "/health").json())["cancelled"] == before["cancelled"] or after["running"]:
            assert time.monotonic() < deadline, after
            time.sleep(0.05)
    finally:
        handle.remove()
    assert after["completed"] == before["completed"] and len(forwards) <= 2  # stopped after the first or gated step
    r = _client(url).completions.create(model=PLAIN, prompt="the cat", max_tokens=20, temperature=0)
    assert r.choices[0].text == _verifier_greedy(engine, "the cat", 20)


def test_health_counts_the_speculative_work(plain):
    url, engine = plain
    _client(url).completions.create(model=PLAIN, prompt="abc", max_tokens=10, temperature=0)
    spec = httpx.get(url + "/health").json()["speculative"]
    assert spec["drafter"] == "lookup" and spec["verifier"].startswith("lookup: ")
    assert spec["tokens"] >= 10 and spec["verifier_forwards"] >= 1
    assert spec["tokens_per_verifier_forward"] == round(spec["tokens"] / spec["verifier_forwards"], 4)


def test_the_servers_drafter_flags_are_every_requests_defaults(dirs):
    """``blockdiff serve --speculative --lookup-tokens 1``: at most one draft per step unless a request says more."""
    from fastapi.testclient import TestClient

    from blockdiff.sampling.speculative import speculative_generate

    engine = _float64(build_engine(str(dirs[1]), PLAIN, lean=False, speculative=True,
                                   drafter_settings={"lookup_tokens": 1}))
    engine.start()
    try:
        with TestClient(create_app(engine)) as http:
            body = {"model": PLAIN, "prompt": "abc abc abc", "max_tokens": 16, "temperature": 0}
            one = http.post("/v1/completions", json=body).json()
            more = http.post("/v1/completions", json={**body, "lookup_tokens": 7}).json()
    finally:
        engine.stop()
    assert one["choices"][0]["text"] == more["choices"][0]["text"] == _verifier_greedy(engine, "abc abc abc", 16)
    for r, tokens in ((one, 1), (more, 7)):  # the counts of speculative_generate with that many lookup drafts
        out = speculative_generate(engine.models.verifier, None, _ids(engine, "abc abc abc"), drafter="lookup",
                                   lookup_tokens=tokens, max_new_tokens=16, eos_token_id=engine.tokenizer.eos_token_id)
        assert (r["usage"]["speculative"]["verifier_forwards"], r["usage"]["speculative"]["drafted_tokens"]) == (
            out.verifier_forwards, out.drafted_tokens)
    assert one["usage"]["speculative"]["drafted_tokens"] != more["usage"]["speculative"]["drafted_tokens"]
    with pytest.raises(UsageError, match="lookup_tokens=0"):  # a bad server default is refused at start
        build_engine(str(dirs[1]), PLAIN, lean=False, speculative=True, drafter_settings={"lookup_tokens": 0})


def test_a_dflash_drafter_serves_the_verifiers_greedy_text_and_its_folder_is_no_request_field(dirs, tmp_path):
    """``--drafter dflash --dflash-path DIR`` on a plain decoder (a random DFlash drafter for it); ``dflash_path``
    names files on the server, so a request may not set it."""
    from fastapi.testclient import TestClient
    from test_dflash import make_drafter, saved

    from blockdiff.modeling.pretrained import load_decoder

    target, tok, _ = load_decoder(str(dirs[1]))
    path = saved(make_drafter(target, mask=tok.mask_token_id), tmp_path)
    engine = _float64(build_engine(str(dirs[1]), PLAIN, lean=False, speculative=True, drafter="dflash",
                                   drafter_settings={"dflash_path": path}))
    engine.start()
    try:
        with TestClient(create_app(engine)) as http:
            for prompt in PROMPTS[:2]:
                body = {"model": PLAIN, "prompt": prompt, "max_tokens": 16, "temperature": 0}
                r = http.post("/v1/completions", json=body).json()
                assert r["choices"][0]["text"] == _verifier_greedy(engine, prompt, 16)
                assert r["usage"]["speculative"]["drafted_tokens"] > 0
            bad = http.post("/v1/completions", json={**body, "dflash_path": "/etc"})
            assert "server starts" in _error(bad, 400, "unsupported_parameter", "dflash_path")["message"]
            assert http.get("/health").json()["speculative"]["drafter"] == "dflash"
    finally:
        engine.stop()


# -- bad requests -------------------------------------------------------------------------------------------------
def _error(r, status: int, code: str | None, param: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code and error["param"] == param, error
    return error


SPECULATIVE_BAD = [  # (field, value, code): each a 400 naming the field
    ("lookup_ngram", 0, "invalid_value"), ("lookup_tokens", 65, "invalid_value"),
    ("lookup_tokens", 2**63, "invalid_value"), ("lookup_ngram", "3", "invalid_type"),
    ("aligned", True, "unsupported_parameter"), ("masks", 2, "unsupported_parameter"),  # other drafters' knobs
    ("drafter", "two_model", "invalid_value"), ("drafter", 3, "invalid_type"),
    ("sampler", "threshold", "unsupported_parameter"), ("tau", 0.5, "unsupported_parameter"),
    ("steps_per_block", 4, "unsupported_parameter"), ("block_length", 4, "unsupported_parameter"),
    ("temperature", -1, "invalid_value"), ("top_p", 2.0, "invalid_value"), ("max_tokens", 65, "max_tokens_over_limit"),
]


@pytest.mark.parametrize("field,value,code", SPECULATIVE_BAD)
def test_bad_speculative_request_fields_are_400s_naming_them(plain, field, value, code):
    url, _ = plain
    body = {"model": PLAIN, "prompt": "x", "max_tokens": 4, field: value}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert field in _error(r, 400, code, field)["message"]


def test_a_prompt_that_fills_the_verifiers_positions_is_refused(plain):
    url, _ = plain
    r = httpx.post(url + "/v1/completions", json={"model": PLAIN, "prompt": "x" * 31, "max_tokens": 4}, timeout=30)
    assert "32 positions" in _error(r, 400, "context_length_exceeded", "prompt")["message"]
    ok = httpx.post(url + "/v1/completions", json={"model": PLAIN, "prompt": "x" * 30, "max_tokens": 4, "drafter":
                                                   "lookup", "lookup_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"  # 1 + 30 + 1 = 32


@pytest.mark.parametrize("field,value", [("drafter", "lookup"), ("lookup_ngram", 2), ("aligned", True),
                                         ("every_length", False)])
def test_a_drafter_setting_on_a_server_that_is_not_speculative_is_a_400(dirs, field, value):
    """Before: accepted and silently ignored (the block loop ran, no drafter)."""
    from fastapi.testclient import TestClient

    engine = build_engine(dirs[0], BLOCK, lean=False)
    engine.start()
    try:
        with TestClient(create_app(engine)) as http:
            r = http.post("/v1/completions", json={"model": BLOCK, "prompt": "x", "max_tokens": 4, field: value})
            assert "--speculative" in _error(r, 400, "unsupported_parameter", field)["message"]
            assert "speculative" not in http.post("/v1/completions", json={"model": BLOCK, "prompt": "x",
                                                                          "max_tokens": 4}).json()["usage"]
    finally:
        engine.stop()


# -- one decision for sample and serve -----------------------------------------------------------------------------
def test_load_speculative_picks_the_verifier_and_drafter_for_each_kind_of_path(dirs):
    from blockdiff.modeling.speculative import load_speculative

    model_dir, base = dirs
    plain_models = load_speculative(str(base), lean=False)
    assert plain_models.drafter == "lookup" and plain_models.model is None and plain_models.verifier is not None
    pair = load_speculative(model_dir, base=str(base), lean=False)
    assert pair.drafter == "two_model" and pair.model is not None and pair.verifier is not None
    assert pair.who == f"two_model: {base} verifies"
    with pytest.raises(UsageError, match="--base NAME"):  # no model.pretrained recorded, no --base
        load_speculative(model_dir, lean=False)
    with pytest.raises(UsageError, match="drafts with a block diffuser"):
        load_speculative(str(base), drafter="two_model", lean=False)
    with pytest.raises(UsageError, match="plain decoder"):
        load_speculative(str(base), base=str(base), lean=False)


def test_sample_and_serve_refuse_drafter_flags_without_speculative_and_sample_drafts_a_plain_decoder(dirs, capsys):
    from blockdiff.cli import main

    model_dir, base = dirs
    for flags in (["--drafter", "lookup"], ["--base", str(base)], ["--lookup-tokens", "3"]):
        assert main(["serve", str(model_dir), *flags]) == 2
        assert "add --speculative" in capsys.readouterr().err
    capsys.readouterr()
    rc = main(["sample", str(base), "--speculative", "--prompt", "the cat", "--max-new-tokens", "12",
               "--temperature", "0"])  # no --drafter: a plain decoder drafts with lookup (before: refused)
    out = capsys.readouterr().out
    assert rc == 0 and "lookup: " in out, out


def test_the_serve_verb_serves_speculatively(dirs):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "blockdiff.cli", "serve", str(dirs[0]), "--speculative", "--base",
                             str(dirs[1]), "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert health["speculative"]["drafter"] == "two_model"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": health["model"], "prompt": "The",
                                                                       "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and json.loads(r.text)["usage"]["speculative"]["verifier_forwards"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode in (0, 130)
