"""What one fused speculative forward costs, taken apart (issue 11): against the base decoder's own cached steps.

For a model with a gated adapter and a causal clean stream (``experiments/speculative/smollm2.sh`` trains one), after
a prefill of ``--context`` tokens, round-robin over ``--rounds`` rounds, median seconds of each, as a multiple of
the base's one-token cached step:

* ``HF step, q tokens``: ``base(input_ids of q tokens, past_key_values=cache, logits_to_keep=1)`` (q = 1, 8, 20);
* ``fused body, gate off``: ``model.hidden_states`` on the fused step's input (4 clean rows + one block of masks,
  its 4-D mask), the adapter off: the decoder with blockdiff's mask, no head;
* ``fused body, gate on``: the same with the adapter on the mask rows;
* ``fused step``: ``FusedBlockDiffusion.score`` + ``commit`` of a step that keeps no draft (body + the head on the
  clean rows and on the next draft rows), and the same with ``every_length=True`` (k + 1 mask blocks).

``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads unless given::

    python experiments/bench_fused_cost.py runs/spec_smollm2/drafter_bl4
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads do not spin

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from blockdiff.modeling.io import load_model_dir  # noqa: E402
from blockdiff.sampling.speculative.fused import FusedBlockDiffusion  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run or model directory with model.adapter=gated_lora, clean_attention=causal")
    parser.add_argument("--context", type=int, default=80)
    parser.add_argument("--drafts", type=int, default=3, help="drafts checked per step (k)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model_dir(args.model).model.float().eval()
    fused = FusedBlockDiffusion(model)
    prompt = [(7 * i + 11) % 1000 + 100 for i in range(args.context)]
    k, j = args.drafts, model.block_length
    drafts = torch.tensor([5 + i for i in range(k)])
    committed = prompt + [4]

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def hf(q):
        out = timed(lambda: model.backbone(input_ids=torch.arange(q)[None] + 5, past_key_values=fused.cache,
                                           use_cache=True, logits_to_keep=1))
        fused.cache.crop(-q)
        return out

    def body(gate_on):
        ids, columns, mask, gate = fused._forward_inputs([4, *drafts.tolist()], len(prompt), len(committed), [k], j)
        out = timed(lambda: model.hidden_states(ids[None], columns[None], mask, past_key_values=fused.cache,
                                                use_cache=True, gate=gate if gate_on else None, fast_gqa=True))
        fused.cache.crop(-len(ids))
        return out

    def step(every):  # score + commit of a step that keeps no draft (every_length: block 0's drafts are projected)
        fused.every_length, fused._next_limit = every, 64
        return timed(lambda: (fused.score(committed, drafts), fused.commit(committed, 0)))

    rows = {"HF step, 1 token": lambda: hf(1), "HF step, 8 tokens": lambda: hf(8), "HF step, 20 tokens": lambda: hf(20),
            f"fused body, gate off ({k + 1} clean + {j} masks)": lambda: body(False),
            f"fused body, gate on ({k + 1} clean + {j} masks)": lambda: body(True),
            "fused step (body + heads)": lambda: step(False),
            f"fused step, every length ({k + 1} clean + {(k + 1) * j} masks)": lambda: step(True)}
    times = {name: [] for name in rows}
    with torch.inference_mode():
        fused._next_limit = 64
        fused.score(prompt, torch.zeros(0, dtype=torch.long))  # prefill: the cache holds prompt[:-1] + ...
        fused.commit(committed, 0)
        for name in rows:
            rows[name]()  # warm-up
        for r in range(args.rounds):
            names = list(rows)[r % len(rows):] + list(rows)[: r % len(rows)]
            for name in names:
                times[name].append(rows[name]())
    one = statistics.median(times["HF step, 1 token"])
    print(f"{args.model}: context {args.context}, k = {k}, block length {j}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, {args.rounds} rounds (medians)")
    print("| forward | ms | x HF 1-token step |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} | {statistics.median(values) / one:.2f} |")


if __name__ == "__main__":
    main()
