"""``blockdiff serve``'s batching, checked in float64 on the tiny random model: a request's tokens are the same alone or
in any batch, and rows cancelled mid-generation leave the batch (and its KV cache) without disturbing the others.

Float64 makes the comparison exact in practice: what can still differ between a batch and a lone run is the rounding
of batched matmuls and masked attention, ~1e-16 relative, which would have to flip a near-tie of the sampler's draw
(docs/serving.md, "Batching"). Both tests are randomized over batch sizes, prompt lengths (shorter than a block,
several blocks, long enough for the sliding window), seeds and cancel times.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from conftest import write_tiny_model_dir

from blockdiff.modeling.io import load_model_dir
from blockdiff.serving.engine import Engine
from blockdiff.serving.protocol import parse_request

NAME = "tiny"


@pytest.fixture(scope="module")
def loaded64(tmp_path_factory):
    loaded = load_model_dir(write_tiny_model_dir(tmp_path_factory.mktemp("batching")))
    loaded.model.to(torch.float64)
    return loaded


def _prompt(rng: random.Random) -> str:
    return "".join(rng.choice("abc xyz.") for _ in range(rng.choice([0, 1, 2, 5, 9, 14, 20])))


def test_cancelled_rows_leave_the_batch_and_its_cache_and_the_others_keep_their_text(loaded64):
    """Random batches, each row cancelled after a random number of blocks (or never): nothing raises, a row that is
    not cancelled gets exactly its text of the uncancelled run, a cancelled one a prefix of it. (20efa4f: a batch whose
    prompts all fit in one block kept every row of its empty KV cache when a row left after the first block, and the
    next forward failed with ``Sizes of tensors must match``.)"""
    model, tok = loaded64.model, loaded64.tokenizer
    rng = random.Random(0)
    for trial in range(6):
        size = rng.randint(2, 7)
        prompts = [[tok.bos_token_id] + tok(_prompt(rng), add_special_tokens=False)["input_ids"] for _ in range(size)]
        if trial % 2:  # every prompt shorter than a block: the first block starts at column 0
            prompts = [p[: rng.randint(1, 3)] for p in prompts]
        seeds = [rng.randrange(2**32) for _ in range(size)]
        settings = dict(max_new_tokens=rng.choice([6, 13, 17]), temperature=1.0, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, sampler=rng.choice(["threshold", "first_hitting", "fixed"]))

        def run(cancel_after):
            asked = [0] * size

            def cancelled(i: int) -> bool:
                asked[i] += 1
                return cancel_after[i] is not None and asked[i] > cancel_after[i]

            return model.generate(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                  cancelled=cancelled, **settings)

        whole = run([None] * size)
        cancel_after = [rng.choice([None, 0, 0, 1, 2, 4]) for _ in range(size)]
        cut = run(cancel_after)
        for i in range(size):
            if cut.stop_reasons[i] == "cancelled":
                assert cancel_after[i] is not None
                assert cut.new_tokens(i) == whole.new_tokens(i)[: len(cut.new_tokens(i))], (trial, i)
            else:
                assert cut.new_tokens(i) == whole.new_tokens(i), (trial, i, cancel_after)
                assert cut.stop_reasons[i] == whole.stop_reasons[i]


async def _tokens(engine: Engine, bodies: list[dict], together: bool) -> list[list[int]]:
    """Each body's choice tokens, all submitted at once (``together``) or one after another."""
    loop = asyncio.get_running_loop()

    async def ask(body: dict):
        queue: asyncio.Queue = asyncio.Queue()
        jobs = engine.prepare(parse_request(body, False, NAME), queue, loop)
        engine.submit(jobs)
        while True:
            _, kind, payload = await queue.get()
            if kind == "error":
                raise payload
            if kind == "done":
                return payload.tokens

    if together:
        return list(await asyncio.gather(*(ask(b) for b in bodies)))
    return [await ask(b) for b in bodies]


def test_a_requests_tokens_are_the_same_alone_or_in_any_batch_in_float64(loaded64):
    """Random concurrent requests of equal settings (so they share batches) against the same requests one at a time.
    Their prompts differ in length, and generations long enough to reach the 32-token window slide it. (20efa4f: a
    prompt left-padded in a batch saw the window slide earlier than alone, so its text changed: 4 of 6 differed.)"""
    engine = Engine(loaded64, NAME, batch_window=0.3, max_batch_size=8)
    engine.start()
    try:
        rng = random.Random(1)
        for trial in range(3):
            settings = {"model": NAME, "max_tokens": rng.choice([12, 36]), "temperature": 0.8,
                        "sampler": rng.choice(["threshold", "first_hitting"])}
            bodies = [{**settings, "prompt": _prompt(rng), "seed": rng.randrange(2**32)}
                      for _ in range(rng.randint(3, 6))]
            engine.batch_window = 0.3
            before = engine.stats()["batches"]
            together = asyncio.run(_tokens(engine, bodies, together=True))
            assert engine.stats()["batches"] - before < len(bodies)  # some of them did share a batch
            engine.batch_window = 0.0
            alone = asyncio.run(_tokens(engine, bodies, together=False))
            assert together == alone, (trial, [i for i, (a, b) in enumerate(zip(together, alone)) if a != b])
    finally:
        engine.stop()
