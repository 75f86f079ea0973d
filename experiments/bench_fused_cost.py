"""What one fused speculative forward costs, taken apart (issue 11): against the base decoder's own cached steps.

For a model with a gated adapter and a causal clean stream (``experiments/speculative/smollm2.sh`` trains one), after
a prefill of ``--context`` tokens, round-robin over ``--rounds`` rounds, median seconds of each, as a multiple of
the base's one-token cached step:

* ``HF step, q tokens``: ``base(input_ids of q tokens, past_key_values=cache, logits_to_keep=1)`` (q = 1, 8, 20);
* ``fused body, gate off``: ``model.hidden_states`` on the fused step's input (4 clean rows + one block of masks,
  its 4-D mask: the arguments ``score`` passes, captured from one call), the adapter off: the decoder with
  blockdiff's mask, no head;
* ``fused body, gate on``: the same with the adapter on the mask rows;
* ``fused step``: ``FusedBlockDiffusion.propose`` + ``score`` + ``commit`` of a step that keeps no draft (body + the
  head on the clean rows and on the next draft rows), and the same with ``every_length=True`` (k + 1 mask blocks).

Rows rotate within each round and each multiple is the median of same-round ratios (``_timing.py``);
``OMP_WAIT_POLICY=PASSIVE`` unless given. Writes ``results.json`` and ``table.md`` into ``--out``::

    python experiments/bench_fused_cost.py runs/spec_smollm2/drafter_bl4
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _report import results_dir, write_report
from _timing import rotations, same_round_ratio, timed, warm_up

from blockdiff import load_model_dir
from blockdiff.sampling.speculative import FusedBlockDiffusion, Sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run or model directory with model.adapter=gated_lora, clean_attention=causal")
    parser.add_argument("--context", type=int, default=80)
    parser.add_argument("--drafts", type=int, default=3, help="drafts checked per step (k)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model_dir(args.model).model.float().eval()
    prompt = [(7 * i + 11) % 1000 + 100 for i in range(args.context)]
    k, j = args.drafts, model.block_length
    drafts = torch.tensor([5 + i for i in range(k)])
    committed = prompt + [4]
    greedy = Sampling(vocab_size=model.vocab_size)

    def ready(every: bool) -> FusedBlockDiffusion:
        """A fused step after the prompt's prefill, as the loop holds it before a step that may check 64 drafts."""
        fused = FusedBlockDiffusion(model, every_length=every)
        fused.propose(prompt, 64, greedy)
        fused.score(prompt, torch.zeros(0, dtype=torch.long))  # prefill: the cache holds prompt[:-1] + ...
        fused.commit(committed, 0)
        fused.propose(committed, 64, greedy)  # the room the next step has: its mask blocks are drafted
        return fused

    fused, fused_all = ready(False), ready(True)
    captured = {}  # the arguments of the fused step's body forward (its input rows, columns, 4-D mask, gate)
    body_of = model.hidden_states

    def capture(*a, **kw):
        captured["call"] = a, kw
        return body_of(*a, **kw)

    model.hidden_states = capture
    with torch.inference_mode():
        fused.score(committed, drafts)
        fused.commit(committed, 0)
    del model.hidden_states  # the instance attribute: back to the class's method
    (ids, columns, mask), body_kw = captured["call"][0][:3], captured["call"][1]

    def hf(q):
        model.backbone(input_ids=torch.arange(q)[None] + 5, past_key_values=fused.cache, use_cache=True,
                       logits_to_keep=1)
        fused.cache.crop(-q)

    def body(gate_on):
        model.hidden_states(ids, columns, mask, past_key_values=fused.cache, use_cache=True,
                            gate=body_kw["gate"] if gate_on else None, fast_gqa=True)
        fused.cache.crop(-ids.shape[1])

    def step(which):  # a step that keeps no draft (every_length: block 0's drafts are projected)
        which.propose(committed, 64, greedy)
        which.score(committed, drafts)
        which.commit(committed, 0)

    calls = {"HF step, 1 token": lambda: hf(1), "HF step, 8 tokens": lambda: hf(8),
             "HF step, 20 tokens": lambda: hf(20),
             f"fused body, gate off ({k + 1} clean + {j} masks)": lambda: body(False),
             f"fused body, gate on ({k + 1} clean + {j} masks)": lambda: body(True),
             "fused step (body + heads)": lambda: step(fused),
             f"fused step, every length ({k + 1} clean + {(k + 1) * j} masks)": lambda: step(fused_all)}
    times = {name: [] for name in calls}
    with torch.inference_mode():
        warm_up(list(calls.values()))
        for _, order in rotations(list(calls), args.rounds):
            for name in order:
                times[name].append(timed(calls[name]).seconds)
    one = times["HF step, 1 token"]
    env = _timing.environment()
    comment = (f"{_timing.header(env)}\n{args.model}: context {args.context}, k = {k}, block length {j}, "
               f"{args.rounds} rounds (medians; x = median of same-round ratios to the HF 1-token step)")
    rows = [[name, f"{statistics.median(values) * 1e3:.1f}", f"{same_round_ratio(values, one):.2f}"]
            for name, values in times.items()]
    write_report(args.out, dict(environment=env, model=str(args.model), context=args.context, drafts=k,
                                block_length=j, rounds=args.rounds, times_s=times), comment,
                 ["forward", "ms", "x HF 1-token step"], rows)
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
