"""The demo's last part: the shipped DFlash drafter and SmolLM2's own ``generate()`` writing the same text side by
side, with tokens/s and tokens per verifier forward (docs/generation.md, "DFlash drafts"). Skipped, with the reason,
when the offline SmolLM2 or its drafter is not installed."""

from __future__ import annotations

import time

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from blockdiff.cli.render import console

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"


def load_target():
    """SmolLM2-135M (fp32, packed for CPU) and its tokenizer, or ``None`` with why not."""
    from blockdiff.errors import UserError
    from blockdiff.modeling.lean import pack_linears, use_lean
    from blockdiff.modeling.pretrained import load_decoder

    try:
        model, tokenizer, _ = load_decoder("smollm2", what="the demo's decoder")
    except UserError as err:
        return None, str(err)
    model.eval()
    if use_lean(model, None):
        pack_linears(model)
    return (model, tokenizer), None


def showcase(target, tokenizer, new_tokens: int = 64, prompt: str = PROMPT, drafter_path: str | None = None) -> dict:
    """Greedy ``generate()`` and ``speculative_generate(drafter="hybrid")`` on one prompt, timed; printed as a table
    and returned (texts, tokens/s, tokens per verifier forward, whether they are identical)."""
    import torch

    from blockdiff.modeling.dflash import load_drafter
    from blockdiff.sampling.speculative import speculative_generate

    network = load_drafter(drafter_path, target)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    plain = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                            pad_token_id=eos)[0, ids.shape[1]:].tolist()
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    out = speculative_generate(target, network, ids, drafter="hybrid", max_new_tokens=new_tokens, eos_token_id=eos)
    fast_s = time.perf_counter() - start
    fast = out.new_tokens(0)
    result = dict(plain=tokenizer.decode(plain, skip_special_tokens=True),
                  fast=tokenizer.decode(fast, skip_special_tokens=True), plain_tok_s=len(plain) / plain_s,
                  fast_tok_s=len(fast) / fast_s, tokens_per_forward=out.tokens_per_verifier_forward,
                  identical=plain == fast)
    table = Table(title=f"SmolLM2-135M, greedy, {new_tokens} new tokens after {prompt.splitlines()[0]!r} ...",
                  show_lines=True)
    table.add_column("SmolLM2's own generate()", ratio=1)
    table.add_column("the same model, drafts from blockdiff's shipped DFlash drafter + lookup (hybrid)", ratio=1)
    table.add_row(Text(result["plain"]), Text(result["fast"]))
    table.add_row(Text(f"{result['plain_tok_s']:.1f} tokens/s, 1.00 tokens per forward"),
                  Text(f"{result['fast_tok_s']:.1f} tokens/s, {result['tokens_per_forward']:.2f} tokens per "
                       "verifier forward"))
    console.print(table)
    same = "token for token the same text" if result["identical"] else "NOT the same text (a bug: please report it)"
    console.print(f"[bold]Lossless:[/] {same}; {result['fast_tok_s'] / result['plain_tok_s']:.2f}x the speed on "
                  "this machine (one run: benchmarks.md has the measured medians).", highlight=False)
    return result


def run_showcase(new_tokens: int = 64) -> dict | None:
    """The demo's last part (module docstring), or a line saying why it is skipped."""
    from blockdiff.modeling.dflash import shipped_drafter

    loaded, why = load_target()
    if loaded is None:
        console.print(f"[yellow]skipping the fast-decoding showcase: {escape(why)}[/]", highlight=False)
        return None
    target, tokenizer = loaded
    if shipped_drafter(target) is None:
        console.print("[yellow]skipping the fast-decoding showcase: no shipped drafter fits SmolLM2 here[/]")
        return None
    console.print("\n[bold]Faster than the model it started from:[/] SmolLM2-135M verifying block drafts",
                  highlight=False)
    return showcase(target, tokenizer, new_tokens)
