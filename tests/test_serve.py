"""``blockdiff serve``: the real server on a free localhost port, driven by the real ``openai`` client and ``httpx``.

The model is the tiny random one of ``conftest.write_tiny_model_dir`` (byte tokenizer, block length 4, context 32),
so what is checked is the plumbing: texts equal offline ``generate`` with the same seed, one server-sent event per
finished block, OpenAI-shaped 4xx errors, batching of equal settings, cancellation on disconnect, and a bounded soak.
"""

from __future__ import annotations

import asyncio
import gc
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
from transformers import DynamicCache  # noqa: E402

from blockdiff.serving import build_engine  # noqa: E402
from blockdiff.serving.app import create_app  # noqa: E402
from blockdiff.serving.deltas import TextDeltas  # noqa: E402

NAME = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(base url, engine)`` of a real uvicorn server in a thread of this process (so the engine can be inspected)."""
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("serve"))
    engine = build_engine(model_dir, NAME, batch_window=0.02, max_batch_size=8, max_tokens_limit=512)
    engine.start()
    port = _free_port()
    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    uv.should_exit = True
    thread.join(timeout=10)
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _offline(engine, prompt: str, seed: int, max_tokens: int, **settings) -> str:
    """What the same request gives without the server: ``generate`` with the request's seed, cut like a response."""
    tok, model = engine.tokenizer, engine.model
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    out = model.generate([ids], generator=[torch.Generator().manual_seed(seed)], max_new_tokens=max_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **settings)
    return TextDeltas(tok, max_tokens, [], {tok.eos_token_id}, model.mask_token_id).text(out.new_tokens(0))


def test_health_and_models(server, client):
    url, _ = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [NAME]


def test_a_completion_is_offline_generate_with_the_same_seed_with_usage_and_nfe(server, client):
    _, engine = server
    r = client.completions.create(model=NAME, prompt="The cat", max_tokens=12, seed=7, temperature=1.0,
                                  extra_body={"sampler": "threshold", "tau": 0.5})
    assert r.choices[0].text == _offline(engine, "The cat", 7, 12, temperature=1.0, sampler="threshold", tau=0.5)
    assert r.usage.prompt_tokens == 1 + len("The cat") and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.model_extra["nfe"] <= 12  # the forwards that denoised it
    assert r.choices[0].finish_reason in ("stop", "length")
    again = client.completions.create(model=NAME, prompt="The cat", max_tokens=12, seed=7, temperature=1.0,
                                      extra_body={"sampler": "threshold", "tau": 0.5})
    assert again.choices[0].text == r.choices[0].text


def test_streaming_sends_one_event_per_finished_block_and_the_same_text(server, client):
    kwargs = dict(model=NAME, prompt="A dog", max_tokens=16, seed=3, temperature=1.0,
                  extra_body={"sampler": "first_hitting"})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    usage = chunks[-1].usage
    blocks = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(final) == 1 and final[0].choices[0].finish_reason == whole.choices[0].finish_reason
    prompt_tail = len("A dog") + 1  # BOS + 5 tokens: the first block holds 2 new tokens
    assert len(blocks) == -(-(usage.completion_tokens - (4 - prompt_tail % 4)) // 4) + 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.model_extra["nfe"] >= 1


def test_chat_completions_stream_and_not(server, client):
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, seed=1)
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, seed=1, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_the_chat_template_is_used_when_the_tokenizer_has_one(server):
    from blockdiff.serving.protocol import parse_request

    _, engine = server
    request = parse_request({"model": NAME, "messages": [{"role": "user", "content": "Hi"}]}, True, NAME)
    tok = engine.tokenizer
    assert engine._encode(request)[0] == [tok.bos_token_id] + tok("user: Hi\nassistant:", add_special_tokens=False)[
        "input_ids"]
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    try:
        assert engine._encode(request)[0] == tok("<user>Hi<assistant>", add_special_tokens=False)["input_ids"]
    finally:
        tok.chat_template = None


BAD = [
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ({"prompt": "x"}, 400, None),
    ({"model": NAME, "prompt": "x", "max_tokens": "ten"}, 400, "invalid_type"),
    ({"model": NAME, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens_over_limit"),
    ({"model": NAME, "prompt": "x" * 40}, 400, "context_length_exceeded"),
    ({"model": NAME, "prompt": "x", "tau": 3.0}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "x", "tau": "high"}, 400, "invalid_type"),
    ({"model": NAME, "prompt": "x", "sampler": "nope"}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "x", "block_length": 5}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "x", "steps_per_block": 0}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "x", "steps_per_block": 513, "sampler": "ddpm"}, 400, "invalid_value"),  # > the limit
    ({"model": NAME, "prompt": "x", "temperature": -1}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "x", "n": 2}, 400, "unsupported_parameter"),
    ({"model": NAME, "prompt": "x", "logprobs": 3}, 400, "unsupported_parameter"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, 400, "invalid_type"),
    ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, None),
    ({"model": NAME, "prompt": [1, 2, 3]}, 400, None),
    ({"model": NAME, "prompt": "x", "seed": -1}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "x", "seed": 2**70}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "x", "max_tokens": 10**30}, 400, "max_tokens_over_limit"),
    ({"model": NAME, "prompt": "x", "temperature": 1e-9}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "x", "block_length": 10**6}, 400, "invalid_value"),
    ([1, 2], 400, None),
]


@pytest.mark.parametrize("body,status,code", BAD)
def test_bad_requests_get_openai_shaped_4xx_errors(server, body, status, code):
    url, _ = server
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code


def test_bad_json_and_bad_chat_messages_are_400(server):
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"


def test_the_openai_client_sees_the_errors_as_its_own_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x", max_tokens=100000)


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as http:
        return await asyncio.gather(*(http.post(url + "/v1/completions", json=b) for b in bodies))


def test_concurrent_requests_with_equal_settings_share_batches_and_others_do_not_mix(server):
    url, engine = server
    before = idle_stats(engine)
    same = [{"model": NAME, "prompt": f"p{i}", "max_tokens": 8, "seed": i, "temperature": 1.0} for i in range(8)]
    other = [{**b, "tau": 0.3, "prompt": f"q{i}"} for i, b in enumerate(same[:4])]
    responses = asyncio.run(_post_all(url, same + other))
    assert all(r.status_code == 200 for r in responses)
    after = engine.stats()
    assert after["batches"] - before["batches"] < 12 and after["largest_batch"] > 1
    for body, r in zip(same + other, responses):  # each text is the one it gets alone: batching changed nothing
        extra = {"tau": body["tau"]} if "tau" in body else {}
        assert r.json()["choices"][0]["text"] == _offline(engine, body["prompt"], body["seed"], 8, temperature=1.0,
                                                          **extra)


def test_a_client_that_disconnects_stops_its_generation(server):
    url, engine = server
    before = engine.stats()["cancelled"]
    body = {"model": NAME, "prompt": "x", "max_tokens": 512, "stream": True, "temperature": 1.0}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json={**body, "sampler": "first_hitting"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one block in, the client leaves
    deadline = time.monotonic() + 20
    while engine.stats()["cancelled"] == before or engine.stats()["running"]:
        assert time.monotonic() < deadline, f"generation did not stop: {engine.stats()}"
        time.sleep(0.05)


def test_soak_200_requests_from_8_clients_no_error_every_response_complete_no_cache_left(server):
    url, engine = server
    errors, done = [], []

    def worker(k: int) -> None:
        with httpx.Client(timeout=60) as http:
            for i in range(25):
                body = {"model": NAME, "prompt": f"client {k} request {i}", "max_tokens": 4 + (i % 3) * 4,
                        "seed": k * 100 + i, "temperature": 1.0, **({"tau": 0.5} if i % 2 else {})}
                try:
                    if i % 3 == 0:
                        with http.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
                        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
                        finals = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
                        assert finals[-1] in ("stop", "length") and all(f is None for f in finals[:-1])
                    else:
                        r = http.post(url + "/v1/completions", json=body)
                        assert r.status_code == 200, r.text
                        choice = r.json()["choices"][0]
                        assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["text"], str)
                        assert r.json()["usage"]["completion_tokens"] <= body["max_tokens"]
                    done.append(1)
                except Exception as err:  # noqa: BLE001 - collected and reported below
                    errors.append(repr(err))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert len(done) == 200
    idle_stats(engine, timeout=10)
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, DynamicCache)], "a KV cache outlived its request"


def test_streamed_text_never_holds_what_the_final_text_drops():
    from blockdiff.modeling.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    ids = tok("héllo END rest", add_special_tokens=False)["input_ids"]
    deltas = TextDeltas(tok, 100, ["END"], {tok.eos_token_id}, tok.mask_token_id)
    pieces = [deltas.block(ids[i : i + 2]) for i in range(0, len(ids), 2)]  # 2-token blocks split "é" and "END"
    pieces.append(deltas.finish(ids))
    assert "".join(pieces) == "héllo " == deltas.text(ids)
    assert all("\ufffd" not in p and "E" not in p for p in pieces)
    capped = TextDeltas(tok, 3, [], {tok.eos_token_id}, tok.mask_token_id)
    assert capped.block(tok("abcdef", add_special_tokens=False)["input_ids"]) == "abc"  # at most max_tokens
    eos = TextDeltas(tok, 100, [], {tok.eos_token_id}, tok.mask_token_id)
    assert eos.block(tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 65]) == "ab"


def test_the_serve_verb_starts_a_server_that_answers_and_stops_on_interrupt(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    model_dir = write_tiny_model_dir(tmp_path)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "blockdiff.cli", "serve", str(model_dir), "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
        assert health["model"] == tmp_path.name  # a model/ folder is named after its run
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": tmp_path.name, "prompt": "The",
                                                                       "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode in (0, 130)


def test_serve_flag_errors_exit_2(capsys):
    from blockdiff.cli import main

    assert main(["serve", "nowhere", "--port", "70000"]) == 2
    assert main(["serve", "does/not/exist"]) == 2
    for flag in ("--max-prompts", "--max-queue", "--max-body-bytes"):
        capsys.readouterr()
        assert main(["serve", "nowhere", flag, "0"]) == 2 and flag in capsys.readouterr().err
    assert main(["serve", "nowhere", "--max-prompts", "9", "--max-queue", "8"]) == 2
    assert "could never be queued" in capsys.readouterr().err


def test_random_bodies_never_get_a_5xx(server):
    """Fields of the API with values of every JSON type: each answer is a 200 or an OpenAI-shaped 4xx, none hangs."""
    import random

    url, _ = server
    rng = random.Random(0)
    values = [None, True, 0, -3, 7, 2**40, 0.5, -1e300, float("1e308"), "", "x", "threshold", [], ["a"], [1, "b"], {},
              {"include_usage": "yes"}]
    fields = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
              "stream_options", "sampler", "tau", "block_length", "steps_per_block", "n", "logprobs", "echo"]
    with httpx.Client(timeout=30) as http:
        for i in range(80):
            body = {"model": NAME, "prompt": "hi", "max_tokens": 4} if i % 2 else {}
            for name in rng.sample(fields, rng.randint(1, 4)):
                body[name] = rng.choice(values)
            route = "/v1/chat/completions" if i % 3 == 0 else "/v1/completions"
            r = http.post(url + route, json=body)
            assert r.status_code < 500, (body, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def _error(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI-shaped error of ``r``, checked: its status, its code and the param it names."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code and error["param"] == param, error
    return error


@pytest.mark.parametrize("value", [99999999999999999999999, 2**63, -(2**63) - 1])
def test_every_integer_field_and_sampler_knob_is_bounded_before_generation(server, value):
    """Each integer of the API and each integer knob of the sampler registry (read from it: a knob added later is
    covered) gets a 400 ``invalid_value`` naming it, never a 500 (20efa4f: ``tokens_per_step`` 1e23 was a 500
    ``OverflowError`` from generation)."""
    from blockdiff.sampling.samplers.registry import knobs

    url, _ = server
    owners = {k.name: k.sampler for k in knobs().values() if k.type is int}
    assert {"tokens_per_step", "max_remask"} <= set(owners)
    fields = {**owners, "top_k": None, "steps_per_block": None, "block_length": None, "seed": None}
    with httpx.Client(timeout=30) as http:
        for name, sampler in fields.items():
            body = {"model": NAME, "prompt": "x", "max_tokens": 4, name: value, **({"sampler": sampler} if sampler
                                                                                  else {})}
            _error(http.post(url + "/v1/completions", json=body), 400, "invalid_value", name)


@pytest.mark.parametrize("field,value,sampler", [
    ("tau", 3.0, None), ("tau", 0, None), ("steps_per_block", 0, None), ("sampler", "nope", None),
    ("temperature", -1, None), ("temperature", 1e-9, None), ("top_p", 2.0, None), ("top_k", -1, None),
    ("block_length", 5, None), ("tokens_per_step", 0, "fixed"), ("max_remask", 0, "remask"),
    ("remask_threshold", 7.0, "remask"), ("entropy_bound", -1.0, "entropy_bound"), ("stop", ["a"] * 5, None),
])
def test_invalid_value_errors_name_their_param(server, field, value, sampler):
    url, _ = server
    body = {"model": NAME, "prompt": "x", "max_tokens": 4, field: value, **({"sampler": sampler} if sampler else {})}
    error = httpx.post(url + "/v1/completions", json=body, timeout=30).json()["error"]
    assert error["param"] == field, error


def test_chat_roles_are_checked_and_completions_never_mention_a_chat_template(server):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "hacker", "content": "x"}]})
    assert "hacker" in _error(r, 400, "invalid_value", "messages[0].role")["message"]
    body = b'{"model": "%s", "prompt": "a \\ud800 b", "max_tokens": 4}' % NAME.encode()  # a lone surrogate
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert "template" not in _error(r, 400, "invalid_value", "prompt")["message"]


def test_the_seed_bound_is_the_clis_and_a_requests_prompt_seeds_wrap_around(server):
    from blockdiff.config import SEED_MAX

    url, engine = server
    assert SEED_MAX == 2**32 - 1  # what torch and numpy take as a seed on every platform
    body = {"model": NAME, "prompt": ["The", "A"], "max_tokens": 6, "temperature": 1.0, "seed": SEED_MAX}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert texts == [_offline(engine, "The", SEED_MAX, 6, temperature=1.0),
                     _offline(engine, "A", 0, 6, temperature=1.0)]  # prompt 1: (SEED_MAX + 1) mod 2**32
    _error(httpx.post(url + "/v1/completions", json={**body, "seed": SEED_MAX + 1}), 400, "invalid_value", "seed")


def test_health_counts_cancelled_requests_apart_from_completed(server):
    url, engine = server
    before = idle_stats(engine)
    body = {"model": NAME, "prompt": "x", "max_tokens": 512, "stream": True, "temperature": 1.0,
            "sampler": "first_hitting"}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))  # one block in, the client leaves
    deadline = time.monotonic() + 20
    while (after := httpx.get(url + "/health").json())["cancelled"] == before["cancelled"] or after["running"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


@pytest.fixture
def limited(tmp_path):
    """A TestClient over an engine whose worker never runs: limits of 3 prompts, 4 queued jobs and 2,000 bytes."""
    from fastapi.testclient import TestClient

    engine = build_engine(write_tiny_model_dir(tmp_path), NAME, max_prompts=3, max_queue=4)
    app = create_app(engine, max_body_bytes=2000)

    @app.get("/typed")
    async def typed(n: int):  # a route FastAPI validates itself (the API's routes read their bodies as JSON)
        return n

    with TestClient(app) as http:
        yield http, engine


def test_limits_on_body_size_prompts_per_request_and_the_queue_answer_openai_shaped_4xx(limited):
    from blockdiff.serving.protocol import parse_request

    http, engine = limited
    _error(http.post("/v1/completions", json={"model": NAME, "prompt": "x" * 3000}), 413, "request_too_large")
    chunked = http.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * 1500, b"x" * 1500, b'"}']),
                        headers={"content-type": "application/json"})  # no content-length: counted while read
    _error(chunked, 413, "request_too_large")
    r = http.post("/v1/completions", json={"model": NAME, "prompt": ["a", "b", "c", "d"], "max_tokens": 4})
    assert "at most 3" in _error(r, 400, "too_many_prompts", "prompt")["message"]
    loop = asyncio.new_event_loop()
    loop.close()  # nobody listens to the jobs that fill the queue
    request = parse_request({"model": NAME, "prompt": ["a", "b", "c"], "max_tokens": 4}, False, NAME)
    engine.submit(engine.prepare(request, asyncio.Queue(), loop))
    r = http.post("/v1/completions", json={"model": NAME, "prompt": ["a", "b"], "max_tokens": 4})
    assert _error(r, 429, "queue_full")["type"] == "rate_limit_error"
    assert http.get("/health").json()["refused"] == 2 and engine.stats()["queued"] == 3


def test_errors_fastapi_raises_itself_are_openai_shaped(limited):
    http, _ = limited
    _error(http.get("/v1/completions"), 405, "method_not_allowed")
    _error(http.post("/v1/nothing", json={}), 404, "not_found")
    _error(http.get("/nothing"), 404, "not_found")
    _error(http.get("/typed", params={"n": "x"}), 422, "invalid_value", "n")


@pytest.mark.parametrize("body", [b"[" * 100000 + b"]" * 100000, b'{"seed": ' + b"9" * 5000 + b"}"])
def test_json_that_python_cannot_parse_is_a_400(server, body):
    """Nesting deeper than the parser's recursion limit, an integer of more digits than Python converts (20efa4f:
    500s)."""
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert "not valid JSON" in _error(r, 400)["message"]
