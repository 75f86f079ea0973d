"""Throughput of `blockdiff serve` with 1, 4 and 16 concurrent streaming clients, against offline `generate()` of the
same model on the same prompts in the same run.

The server runs in this process (uvicorn in a thread, a real localhost port); each client is a thread with its own
`httpx` connection that sends its requests one after another, streaming. Per request: time to first block (the first
server-sent event) and new tokens. Offline rows: `model.generate` on the same prompts one at a time (batch 1) and in
batches of the client count (what the server's batching can at best reach). Everything uses the same settings
(temperature 0.8, the model's sampler defaults, `max_tokens`), seeds per request. Clocks, the environment header and
`OMP_WAIT_POLICY=PASSIVE` come from `_timing.py`; `results.json` and `table.md` go to `--out` (default
`experiments/results/bench_serve`).

    python experiments/bench_serve.py runs/demo_bl4 --clients 1 4 16 --requests 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import httpx
import torch
import uvicorn
from _report import results_dir, write_report
from _timing import Stopwatch

from blockdiff.serving import build_engine
from blockdiff.serving.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def prompts_of(n: int) -> list[str]:
    heads = ["ROMEO.", "JULIET.", "KING.", "First Citizen.", "HAMLET.", "Enter", "O, ", "My lord,"]
    return [heads[i % len(heads)] for i in range(n)]


def one_request(http: httpx.Client, url: str, name: str, prompt: str, seed: int, max_tokens: int) -> dict:
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    watch, first, usage = Stopwatch(), None, None
    with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if first is None:
                first = watch.elapsed()
            if line != "data: [DONE]":
                usage = json.loads(line[6:]).get("usage") or usage
    return {"ttfb": first, "seconds": watch.elapsed(), "tokens": usage["completion_tokens"]}


def serve_row(url: str, name: str, clients: int, requests: int, max_tokens: int) -> dict:
    prompts, results, lock = prompts_of(requests), [], threading.Lock()
    per_client = [list(range(k, requests, clients)) for k in range(clients)]

    def client(indices: list[int]) -> None:
        with httpx.Client(timeout=600) as http:
            for i in indices:
                out = one_request(http, url, name, prompts[i], i, max_tokens)
                with lock:
                    results.append(out)

    with Stopwatch() as watch:
        threads = [threading.Thread(target=client, args=(ix,)) for ix in per_client]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = watch.seconds
    ttfb = sorted(r["ttfb"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_second": tokens / wall, "ttfb_p50": statistics.median(ttfb),
            "ttfb_p95": ttfb[min(len(ttfb) - 1, int(0.95 * len(ttfb)))]}


def offline_row(engine, batch: int, requests: int, max_tokens: int) -> dict:
    tok, model = engine.tokenizer, engine.model
    ids = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in prompts_of(requests)]
    tokens = 0
    with Stopwatch() as watch:
        for s in range(0, requests, batch):
            chunk = ids[s : s + batch]
            gens = [torch.Generator().manual_seed(s + j) for j in range(len(chunk))]
            out = model.generate(chunk, generator=gens, max_new_tokens=max_tokens, temperature=0.8,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            tokens += int(out.lengths.sum())
    wall = watch.seconds
    return {"batch": batch, "requests": requests, "tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=results_dir(__file__))
    a = p.parse_args()
    engine = build_engine(a.model, "bench", batch_window=a.batch_window_ms / 1000, max_batch_size=max(a.clients))
    engine.start()
    url, server, thread = start(engine)
    rows = {"serve": [], "offline": []}
    one_request(httpx.Client(timeout=600), url, "bench", "warm-up", 0, 8)
    for clients in a.clients:  # interleaved: offline batch 1, server at this client count, offline at this batch
        rows["offline"].append(offline_row(engine, 1, a.requests, a.max_tokens))
        rows["serve"].append(serve_row(url, "bench", clients, a.requests, a.max_tokens))
        rows["serve"][-1]["largest_batch"] = engine.stats()["largest_batch"]
        if clients > 1:
            rows["offline"].append(offline_row(engine, clients, a.requests, a.max_tokens))
    server.should_exit = True
    thread.join(timeout=10)
    engine.stop()
    env = _timing.environment()
    columns = ["run", "requests", "new tokens", "wall s", "tokens/s", "p50 time to first block (s)", "p95 (s)"]
    table = [[f"serve, {r['clients']} streaming client(s)", str(r["requests"]), str(r["tokens"]), f"{r['seconds']:.1f}",
              f"{r['tokens_per_second']:.1f}", f"{r['ttfb_p50']:.3f}", f"{r['ttfb_p95']:.3f}"] for r in rows["serve"]]
    table += [[f"offline generate(), batch {r['batch']}", str(r["requests"]), str(r["tokens"]), f"{r['seconds']:.1f}",
               f"{r['tokens_per_second']:.1f}", "—", "—"] for r in rows["offline"]]
    write_report(a.out, {"environment": env, "args": vars(a), **rows}, _timing.header(env), columns, table)
    print((a.out / "table.md").read_text())


if __name__ == "__main__":
    main()
