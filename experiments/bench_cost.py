"""What a forward with k query tokens costs, relative to a 1-token cached decode step (issue 11, part 1).

    OMP_WAIT_POLICY=PASSIVE python experiments/bench_cost.py --model smollm2 --rounds 12
    OMP_WAIT_POLICY=PASSIVE python experiments/bench_cost.py --model demo --rounds 30

For each k in {1, 2, 4, 8, 16, 32, 64}, over a KV cache already holding a 128-token prefix (batch 1, fp32):

* ``hf``: the plain decoder, ``backbone(k tokens, past_key_values=cache)``, logits on all k rows (what a verifier
  of k drafted tokens needs), the cache cropped back to the prefix after each forward;
* ``block``: blockdiff's block step exactly as ``sampling/generation.py`` runs it (``block_rows``, then the output
  head on the k masked rows), block length k, k mask tokens, the cache read-only.

Round-robin: within a round, for every k, ``hf`` k=1, ``hf`` k and ``block`` k run one after the other; each
ratio is taken within its round and the table gives the medians over rounds. A forward that costs ``c`` decode
steps pays for itself when it commits more than ``c`` tokens, and is ``S`` times faster than AR decoding when it
commits ``S c``. ``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads (libgomp's spin-waiting makes timings on a
shared machine erratic); the output says so.

``--model smollm2``: the offline SmolLM2-135M (de-quantised GGUF, ~20 s), with a mask token added as the fine-tune
path adds it (``load_pretrained``). ``--model demo``: the network of ``configs/demo.yaml`` at random init (timing
only; 256 positions so that 128 + 64 fit).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from blockdiff.modeling.model import BlockDiffusionLM  # noqa: E402
from blockdiff.modeling.spec import BlockDiffusionSpec  # noqa: E402
from blockdiff.sampling.grid import block_rows, layout  # noqa: E402

KS = (1, 2, 4, 8, 16, 32, 64)
PREFIX = 128
ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    """``(backbone, mask id)`` in eval mode, fp32."""
    if name == "smollm2":
        from blockdiff.modeling.pretrained import load_pretrained

        backbone, tokenizer, _ = load_pretrained("smollm2")
        return backbone.eval(), tokenizer.mask_token_id
    from blockdiff.config import load_config
    from blockdiff.training.builders import build_backbone

    cfg = load_config([ROOT / "configs" / "demo.yaml"])
    vocab = cfg.data.bpe_vocab_size
    return build_backbone(cfg.model, vocab_size=vocab, max_seq_len=256).eval(), vocab - 1


def hf_step(backbone, cache, ids: torch.Tensor) -> None:
    """One plain cached forward of ``ids`` (1, k), logits on every row; the cache is cropped back."""
    backbone(input_ids=ids, past_key_values=cache, use_cache=True)
    cache.crop(-ids.shape[1])


def block_state(backbone, mask_id: int, k: int, prefix: list[int]):
    """A block-diffusion model of block length ``k`` and the block loop's state with ``prefix`` cached and the
    next block (k masks) ready, as ``generate`` leaves them after the block's first forward."""
    model = BlockDiffusionLM(backbone, BlockDiffusionSpec(mask_id, k, True, 4096))
    st = layout([prefix], k, 0, "cpu")
    st.cols[:, PREFIX:] = mask_id
    block_rows(model, st, PREFIX, PREFIX + k, True)  # prefills the cache with the prefix (feed from column 0)
    return model, st


def block_step(model, st) -> None:
    """One denoising forward of the block (every row still masked): body over the cache, head on k rows."""
    k = model.block_length
    rows = block_rows(model, st, PREFIX, PREFIX + k, True)  # (1, k, d)
    model.logits(rows.flatten(0, 1))  # (k, v)


def seconds(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "demo"], default="smollm2")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--reps", type=int, default=2, help="forwards per timing (their mean)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, {args.threads} threads, batch 1, fp32, "
          f"prefix {PREFIX} tokens cached, model {args.model}", flush=True)
    backbone, mask_id = load(args.model)
    prefix = torch.randint(0, mask_id, (PREFIX,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        cache = backbone(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        states = {k: block_state(backbone, mask_id, k, prefix) for k in KS}
        ids = {k: torch.randint(0, mask_id, (1, k), generator=torch.Generator().manual_seed(k)) for k in KS}
        for k in KS:  # warm-up
            hf_step(backbone, cache, ids[k])
            block_step(*states[k])
        base, hf, block = [], {k: [] for k in KS}, {k: [] for k in KS}
        for r in range(args.rounds):
            for k in KS:
                one = seconds(lambda: hf_step(backbone, cache, ids[1]), args.reps)
                base.append(one)
                hf[k].append(seconds(lambda: hf_step(backbone, cache, ids[k]), args.reps) / one)
                block[k].append(seconds(lambda: block_step(*states[k]), args.reps) / one)
            print(f"round {r}: hf k=1 {statistics.median(base[-len(KS):]) * 1e3:.1f} ms", flush=True)
    step = statistics.median(base) * 1e3
    print(f"\n1-token cached decode step (hf, k=1): median {step:.1f} ms over {len(base)} timings\n")
    print("| k | hf decoder, k tokens (x step) | blockdiff block step, k masks (x step) | tokens/forward to beat AR "
          "(block) | for 1.6x AR |")
    print("|---:|---:|---:|---:|---:|")
    for k in KS:
        h, b = statistics.median(hf[k]), statistics.median(block[k])
        print(f"| {k} | {h:.2f} | {b:.2f} | {b:.2f} | {1.6 * b:.2f} |")


if __name__ == "__main__":
    main()
