"""The demo-size speculative recipe's two Python steps (``run.sh`` calls them; docs: README.md here).

* ``export-base AR_RUN OUT``: save the backbone of a blockdiff run trained at ``model.block_length=1
  model.logit_shift=true`` as a plain Hugging Face causal LM (``save_pretrained`` + the run's tokenizer; its
  generation config suppresses the mask token, which blockdiff's SUBS head never predicts), and check on
  held-out windows that its next-token logits equal the blockdiff model's at L'=1 (every column but the
  mask token, which SUBS sets to -inf in blockdiff and which the exported head never ranks first there).
* ``bench DRAFTER BASE AR_RUN --out DIR``: on held-out prompts of the AR run's corpus (the tail neither the
  AR model nor the distilled prompts saw), one prompt at a time, round-robin over rows (the starting row rotates
  with the prompt): HF ``generate()`` of BASE (greedy; and sampled at T=0.8), blockdiff speculative decoding
  (DRAFTER drafts, BASE verifies; greedy and T=0.8), the fused one-forward speculative path when this blockdiff
  has it, and the native threshold sampler (tau 0.9) on DRAFTER alone. Reports tokens/s, the median over prompts
  of (row tokens/s / HF tokens/s of the same prompt and temperature), tokens per verifier forward, the
  acceptance histogram, forwards per token and the exact-match rate of greedy rows vs HF greedy. Timing, the
  rotation, the same-prompt ratios and the environment header come from ``experiments/_timing.py``
  (``OMP_WAIT_POLICY=PASSIVE`` unless given); ``results.json`` and ``table.md`` go to ``--out`` (``_report.py``;
  results kept in the repository live under ``experiments/results/speculative/``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: _timing, _report

import _timing  # noqa: E402  sets OMP_WAIT_POLICY before torch loads
import torch  # noqa: E402
from _report import write_report  # noqa: E402
from _timing import rotations, same_round_ratio, timed  # noqa: E402

from blockdiff import load_model_dir  # noqa: E402
from blockdiff.evaluation.heldout import held_out_split  # noqa: E402
from blockdiff.modeling.pretrained import load_decoder  # noqa: E402


def held_out_prompts(ar_run: str, tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens: the starts of held-out windows spread over the AR run's val split."""
    cfg = load_model_dir(ar_run).config
    val = held_out_split(cfg.data, tokenizer).corpus.val
    step = max(1, len(val) // count)
    return [list(map(int, val[i * step]["input_ids"][:length])) for i in range(count)]


def export_base(ar_run: str, out: str) -> None:
    loaded = load_model_dir(ar_run)
    model = loaded.model.eval()
    spec = model.spec
    assert model.block_length == 1 and spec.logit_shift, "the AR run must have block_length=1 and logit_shift=true"
    backbone = model.backbone
    # SUBS never predicts the mask token (its logit is -inf in blockdiff); the exported head still has a row for it
    # (tied to an input embedding that no loss at L'=1 trains), so generate() is told to suppress it: HF generate()
    # of the base (and `blockdiff distill`, which calls it) is then exactly the blockdiff model at L'=1.
    backbone.generation_config.suppress_tokens = [model.mask_token_id]
    Path(out).mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    base, _, _ = load_decoder(out, what="--base")
    base.eval()
    windows = torch.tensor(held_out_prompts(ar_run, loaded.tokenizer, 8, 128))  # (b, n)
    with torch.no_grad():
        xt = windows.clone()
        xt[:, 1:] = model.mask_token_id  # every token but the conditioning one masked: row i reads x0[:i]
        ours = model(xt, windows)[:, 1:]  # (b, n-1, v): blockdiff's prediction of token i, i >= 1
        hf = base(windows).logits[:, :-1].float()  # (b, n-1, v): the HF causal LM's next-token logits
    keep = torch.ones(ours.shape[-1], dtype=torch.bool)
    keep[model.mask_token_id] = False
    diff = (ours[..., keep] - hf[..., keep]).abs().max().item()
    same_argmax = (ours.argmax(-1) == hf.argmax(-1)).float().mean().item()
    mask_first = (hf.argmax(-1) == model.mask_token_id).float().mean().item()
    result = {"max_abs_logit_diff": diff, "argmax_agreement": same_argmax, "mask_token_argmax_rate": mask_first,
              "rows": int(ours.shape[0] * ours.shape[1])}
    Path(out, "check.json").write_text(json.dumps(result, indent=2))
    print(f"base check ({result['rows']} held-out positions): max |logit diff| {diff:.2e} (mask column excluded), "
          f"argmax agreement {same_argmax:.4f}, mask token ranked first {mask_first:.4f}")
    if diff > 1e-3 or same_argmax < 1.0:
        raise SystemExit("the exported backbone does not reproduce the blockdiff model at L'=1")


def bench(args) -> None:
    from blockdiff.sampling.speculative import speculative_generate

    torch.set_num_threads(args.threads)
    loaded = load_model_dir(args.drafter)
    drafter = loaded.model.eval()
    tok = loaded.tokenizer
    verifier, _, _ = load_decoder(args.base, what="--base")
    verifier.eval()
    prompts = held_out_prompts(args.ar_run, tok, args.num_prompts, args.prompt_tokens)
    eos = tok.eos_token_id
    n = args.new_tokens
    try:  # the fused one-forward path (blockdiff/sampling/speculative/fused.py), where this blockdiff has it
        import blockdiff.sampling.speculative.fused  # noqa: F401
        fused = True
    except ImportError:
        fused = False

    def hf(ids, temperature, seed):
        torch.manual_seed(seed)
        x = torch.tensor([ids])
        kw = {"do_sample": temperature > 0, "max_new_tokens": n, "eos_token_id": eos, "pad_token_id": eos}
        if temperature > 0:
            kw.update(temperature=temperature, top_k=0, top_p=1.0)
        else:
            kw.update(temperature=None, top_k=None, top_p=None)
        out = verifier.generate(x, attention_mask=torch.ones_like(x), **kw)
        new = out[0, len(ids):].tolist()
        return {"tokens": new, "forwards": len(new)}

    def spec(ids, temperature, seed, one_forward=False):
        g = torch.Generator().manual_seed(seed)
        pair = (drafter, None) if one_forward else (verifier, drafter)  # fused: the drafter verifies with its own base
        out = speculative_generate(*pair, torch.tensor([ids]), max_new_tokens=n,
                                   temperature=temperature, eos_token_id=eos, generator=g)
        return {"tokens": out.new_tokens(0), "forwards": out.verifier_forwards,
                "drafter_forwards": out.drafter_forwards,
                "histogram": list(out.acceptance_histogram), "drafted": out.drafted_tokens,
                "accepted": out.accepted_tokens}

    def native(ids, temperature, seed):
        g = torch.Generator().manual_seed(seed)
        out = drafter.generate([ids], max_new_tokens=n, sampler="threshold", tau=args.tau, temperature=temperature,
                               eos_token_id=eos, generator=g)
        return {"tokens": out.new_tokens(0), "forwards": int(out.nfe)}

    rows = {
        "hf_greedy": (hf, 0.0), "spec_greedy": (spec, 0.0), f"native_tau{args.tau}_greedy": (native, 0.0),
    }
    if args.sampled:
        rows.update({"hf_T0.8": (hf, 0.8), "spec_T0.8": (spec, 0.8), f"native_tau{args.tau}_T0.8": (native, 0.8)})
    if fused:
        rows["fused_spec_greedy"] = (lambda ids, t, s: spec(ids, t, s, one_forward=True), 0.0)
        if args.sampled:
            rows["fused_spec_T0.8"] = (lambda ids, t, s: spec(ids, t, s, one_forward=True), 0.8)
    names = list(rows)
    raw = {name: [] for name in names}
    with torch.inference_mode():
        fn, t = rows["spec_greedy"]
        fn(prompts[0][:8], t, 0)  # warm-up
        rows["hf_greedy"][0](prompts[0][:8], 0.0, 0)
        for i, order in rotations(names, len(prompts)):  # a round per prompt
            ids = prompts[i]
            for name in order:
                fn, t = rows[name]
                call = timed(lambda: fn(ids, t, 1000 + i))
                r = call.result
                r["seconds"] = call.seconds
                r["tokens_per_s"] = len(r["tokens"]) / r["seconds"]
                raw[name].append(r)
            print(f"prompt {i}: " + ", ".join(f"{k} {raw[k][-1]['tokens_per_s']:.1f} tok/s" for k in names), flush=True)

    def judge(ids, new):  # nats/token of the continuation under the base model (the teacher; mask column removed)
        if not new:
            return 0.0, 0
        x = torch.tensor([ids + new])
        with torch.no_grad():
            logits = verifier(x).logits[0, len(ids) - 1 : -1].float()  # (m, v): predicts each new token
        logits[:, tok.mask_token_id] = float("-inf")
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(new), reduction="sum").item()
        return nll, len(new)

    def unigram_entropy(new):  # nats, of one continuation's token histogram (repetition lowers it)
        if not new:
            return 0.0
        counts = torch.bincount(torch.tensor(new)).float()
        p = counts[counts > 0] / len(new)
        return float(-(p * p.log()).sum())

    def ref(name):
        return "hf_T0.8" if name.endswith("T0.8") else "hf_greedy"

    summary = {}
    for name in names:
        rs = raw[name]
        toks = sum(len(r["tokens"]) for r in rs)
        scored = [judge(prompts[i], r["tokens"]) for i, r in enumerate(rs)]
        s = {"tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs),
             "x_hf_median": same_round_ratio([r["tokens_per_s"] for r in rs],
                                             [r["tokens_per_s"] for r in raw[ref(name)]]),
             "new_tokens": toks, "forwards_per_token": sum(r["forwards"] for r in rs) / max(1, toks),
             "judge_nll": sum(a for a, _ in scored) / max(1, sum(b for _, b in scored)),
             "unigram_entropy": statistics.mean(unigram_entropy(r["tokens"]) for r in rs)}
        if name.endswith("greedy"):
            s["exact_match_vs_hf_greedy"] = sum(r["tokens"] == raw["hf_greedy"][i]["tokens"]
                                                for i, r in enumerate(rs)) / len(rs)
        if "histogram" in rs[0]:
            width = max(len(r["histogram"]) for r in rs)
            hist = [sum(r["histogram"][a] if a < len(r["histogram"]) else 0 for r in rs) for a in range(width)]
            s.update(tokens_per_verifier_forward=toks / sum(r["forwards"] for r in rs),
                     drafter_forwards_per_token=sum(r["drafter_forwards"] for r in rs) / toks,
                     acceptance_rate=sum(r["accepted"] for r in rs) / max(1, sum(r["drafted"] for r in rs)),
                     acceptance_histogram=hist)
        summary[name] = s
    env = _timing.environment()
    settings = {"prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": n,
                "drafter": args.drafter, "base": args.base, "block_length": drafter.block_length,
                "note": "ratios are per-prompt (a round per prompt, rows rotating), medians"}
    columns = ["row", "tokens/s (median)", "× HF (median)", "forwards/token", "tokens/verifier forward", "acceptance",
               "histogram (drafts kept per step)", "exact vs HF greedy", "judge NLL", "unigram entropy"]
    table = [[name, f"{s['tokens_per_s_median']:.1f}", f"{s['x_hf_median']:.2f}", f"{s['forwards_per_token']:.3f}",
              f"{s.get('tokens_per_verifier_forward', float('nan')):.2f}",
              f"{s.get('acceptance_rate', float('nan')):.2f}",
              str(s.get("acceptance_histogram", "")), str(s.get("exact_match_vs_hf_greedy", "")),
              f"{s['judge_nll']:.3f}", f"{s['unigram_entropy']:.2f}"] for name, s in summary.items()]
    out = Path(args.out)
    write_report(out, {"environment": env, "settings": settings, "summary": summary, "raw": raw, "prompts": prompts},
                 _timing.header(env), columns, table)
    print((out / "table.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export-base")
    e.add_argument("ar_run")
    e.add_argument("out")
    b = sub.add_parser("bench")
    b.add_argument("drafter")
    b.add_argument("base")
    b.add_argument("ar_run")
    b.add_argument("--out", required=True)
    b.add_argument("--num-prompts", type=int, default=8)
    b.add_argument("--prompt-tokens", type=int, default=16)
    b.add_argument("--new-tokens", type=int, default=96)
    b.add_argument("--tau", type=float, default=0.9)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--sampled", action="store_true", help="also the T=0.8 rows")
    args = p.parse_args()
    if args.cmd == "export-base":
        export_base(args.ar_run, args.out)
    else:
        bench(args)


if __name__ == "__main__":
    main()
