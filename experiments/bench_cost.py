"""What a forward with k query tokens costs, relative to a 1-token cached decode step (issue 11, part 1).

    python experiments/bench_cost.py --model smollm2 --rounds 12
    python experiments/bench_cost.py --model demo --rounds 30

For each k in {1, 2, 4, 8, 16, 32, 64}, over a KV cache already holding a 128-token prefix (batch 1, fp32):

* ``hf``: the plain decoder, ``backbone(k tokens, past_key_values=cache)``, logits on all k rows (what a verifier
  of k drafted tokens needs), the cache cropped back to the prefix after each forward;
* ``block``: blockdiff's block step as the block loop runs it (``sampling/grid.py``), written with the model's public
  methods: one ``hidden_states`` forward of the k mask rows over the read-only cache (the mask from
  ``sampling_mask``, built once per block), the logit shift, then the output head on the k rows; block length k.

Round-robin (``_timing.py``): within a round, for every k, ``hf`` k=1, ``hf`` k and ``block`` k run one after the
other; each ratio is taken within its round and the table gives the medians over rounds. A forward that costs ``c``
decode steps pays for itself when it commits more than ``c`` tokens, and is ``S`` times faster than AR decoding when
it commits ``S c``. ``OMP_WAIT_POLICY=PASSIVE`` unless given (``_timing.py``); the header says which.

``--model smollm2``: the offline SmolLM2-135M (de-quantised GGUF, ~20 s), with a mask token added as the fine-tune
path adds it (``load_pretrained``). ``--model demo``: the network of ``configs/demo.yaml`` at random init (timing
only; 256 positions so that 128 + 64 fit). Writes ``results.json`` and ``table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _report import results_dir, write_report
from _timing import rotations, same_round_ratio, timed, warm_up

from blockdiff import BlockDiffusionLM, BlockDiffusionSpec

KS = (1, 2, 4, 8, 16, 32, 64)
PREFIX = 128
ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    """``(backbone, mask id)`` in eval mode, fp32."""
    if name == "smollm2":
        from blockdiff.modeling.pretrained import load_pretrained

        backbone, tokenizer, _ = load_pretrained("smollm2")
        return backbone.eval(), tokenizer.mask_token_id
    from blockdiff import build_backbone, load_config

    cfg = load_config([ROOT / "configs" / "demo.yaml"])
    vocab = cfg.data.bpe_vocab_size
    return build_backbone(cfg.model, vocab_size=vocab, max_seq_len=256).eval(), vocab - 1


def hf_step(backbone, cache, ids: torch.Tensor) -> None:
    """One plain cached forward of ``ids`` (1, k), logits on every row; the cache is cropped back."""
    backbone(input_ids=ids, past_key_values=cache, use_cache=True)
    cache.crop(-ids.shape[1])


class BlockStep:
    """A block-diffusion model of block length ``k`` with ``prefix`` cached and the next block (k masks) ready, as
    the block loop holds them after the block's first forward; ``__call__`` is one more denoising forward."""

    def __init__(self, backbone, mask_id: int, k: int, prefix: list[int]):
        self.model = model = BlockDiffusionLM(backbone, BlockDiffusionSpec(mask_id, k, True, 4096))
        first = torch.zeros(1, dtype=torch.long)  # (b,) no left padding
        columns = torch.arange(PREFIX)  # the prefix: whole blocks (k divides 128), block-causal as the loop feeds it
        hidden, self.cache = model.hidden_states(
            torch.tensor([prefix]), columns[None], model.sampling_mask(columns, columns, first, allow_full=True),
            past_key_values=model.new_cache(), use_cache=True, fast_gqa=True,
        )  # (1, PREFIX, d)
        self.before = hidden[:, -1:]  # (1, 1, d) the last finished column: the block's first row reads it (shift)
        self.columns = torch.arange(PREFIX, PREFIX + k)  # (k,) the block
        self.ids = torch.full((1, k), mask_id)  # (1, k) every row still masked
        self.mask = model.sampling_mask(self.columns, torch.arange(PREFIX + k), first, PREFIX, allow_full=True)
        self.gate = torch.ones(1, k)  # (1, k) the block is the noisy stream

    def __call__(self) -> None:
        """One denoising forward: body over the cache (read-only: cropped back), logit shift, head on k rows."""
        hidden, cache = self.model.hidden_states(self.ids, self.columns[None], self.mask, past_key_values=self.cache,
                                                 use_cache=True, gate=self.gate, fast_gqa=True)  # (1, k, d)
        cache.crop(-len(self.columns))
        self.model.logits(self.model.apply_logit_shift(hidden, self.before))  # (1, k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "demo"], default="smollm2")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--reps", type=int, default=2, help="forwards per timing (their mean)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="query tokens per forward (divide 128)")
    parser.add_argument("--out", type=Path, default=results_dir(__file__, "{model}"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch 1, fp32, prefix {PREFIX} tokens cached, model {args.model}", flush=True)
    backbone, mask_id = load(args.model)
    prefix = torch.randint(0, mask_id, (PREFIX,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        cache = backbone(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        ids = {k: torch.randint(0, mask_id, (1, k), generator=torch.Generator().manual_seed(k)) for k in args.ks}
        calls = {}
        for k in args.ks:
            calls["hf", k] = lambda k=k: hf_step(backbone, cache, ids[k])
            calls["block", k] = BlockStep(backbone, mask_id, k, prefix)
        warm_up(list(calls.values()))
        base, times = {k: [] for k in args.ks}, {key: [] for key in calls}  # seconds per round
        for r, order in rotations(args.ks, args.rounds):
            for k in order:  # the k=1 step, then the two k-token forwards, back to back
                base[k].append(timed(calls["hf", 1], args.reps).seconds)
                for kind in ("hf", "block"):
                    times[kind, k].append(timed(calls[kind, k], args.reps).seconds)
            print(f"round {r}: hf k=1 {statistics.median([base[k][-1] for k in args.ks]) * 1e3:.1f} ms", flush=True)
    step = statistics.median([t for k in args.ks for t in base[k]]) * 1e3
    results = [dict(k=k, hf_x_step=same_round_ratio(times["hf", k], base[k]),
                    block_x_step=same_round_ratio(times["block", k], base[k]), step_s=base[k],
                    hf_s=times["hf", k], block_s=times["block", k]) for k in args.ks]
    env = _timing.environment()
    columns = ["k", "hf decoder, k tokens (x step)", "blockdiff block step, k masks (x step)",
               "tokens/forward to beat AR (block)", "for 1.6x AR"]
    rows = [[str(r["k"]), f"{r['hf_x_step']:.2f}", f"{r['block_x_step']:.2f}", f"{r['block_x_step']:.2f}",
             f"{1.6 * r['block_x_step']:.2f}"] for r in results]
    comment = (f"{_timing.header(env)}\nmodel {args.model}, batch 1, fp32, prefix {PREFIX} tokens cached; "
               f"{args.rounds} rounds x {args.reps} forwards per timing\n"
               f"1-token cached decode step (hf, k=1): median {step:.1f} ms; x step = median of same-round ratios")
    out = Path(str(args.out).format(model=args.model))
    write_report(out, dict(environment=env, model=args.model, prefix=PREFIX, rounds=args.rounds, reps=args.reps,
                           step_ms=step, results=results), comment, columns, rows)
    print(comment)
    print((out / "table.md").read_text().split("-->\n")[-1])


if __name__ == "__main__":
    main()
