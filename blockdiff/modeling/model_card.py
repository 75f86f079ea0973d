"""The model card (``README.md``) written into every model directory: what the Hugging Face Hub shows for it.

YAML front matter as the Hub reads it (``library_name: blockdiff``, ``base_model`` when the model was fine-tuned from
one, ``tags``, and a ``license`` left for the user to fill in), then the held-out NELBO / PPL bound / bits per byte,
the block length, the sampler defaults, the training recipe and a snippet that loads and samples the model.
``held_out_metrics`` reads the last validation a run logged (``logs/metrics.csv``), for exports from a checkpoint.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from blockdiff.modeling.rundir import MODEL_CARD, RunDir

__all__ = ["MODEL_CARD", "model_card", "write_model_card", "held_out_metrics"]

METRIC_KEYS = ("val/nll", "val/ppl", "val/bpb")


def held_out_metrics(run_root: str | Path) -> dict[str, float] | None:
    """The last logged ``val/nll``, ``val/ppl``, ``val/bpb`` (and ``step``) of a run, or ``None`` without any."""
    path = RunDir(Path(run_root)).metrics
    if not path.is_file():
        return None
    last = None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("val/nll"):
                    last = row
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if last is None:
        return None
    out = {k: float(last[k]) for k in METRIC_KEYS if last.get(k)}
    if last.get("step"):
        out["step"] = int(float(last["step"]))
    return out


def _front_matter(cfg, model) -> str:
    base = cfg.model.pretrained if cfg is not None else None
    tags = ["blockdiff", "block-diffusion", "diffusion-language-model", "text-generation",
            f"block-length-{model.block_length}"]
    lines = ["---", "library_name: blockdiff", "license: null  # fill in: the license of the weights and the data",
             "pipeline_tag: text-generation"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:", *[f"- {t}" for t in tags], "---"]
    return "\n".join(lines)


def _metrics_table(metrics: dict | None) -> str:
    if not metrics or not all(k in metrics for k in METRIC_KEYS):
        return "No held-out evaluation was recorded with this export; measure it with `blockdiff eval DIR`."
    nll = metrics["val/nll"]
    where = f" at step {metrics['step']}" if "step" in metrics else ""
    return "\n".join([
        f"Held-out split of the training corpus{where} (an upper bound on the true NLL: the block-diffusion NELBO, "
        "`t ~ U[eps, 1]`):",
        "",
        "| NELBO (nats/token) | PPL bound | bits/byte bound |",
        "|---|---|---|",
        f"| {nll:.4f} | {metrics.get('val/ppl', math.exp(nll)):.2f} | {metrics['val/bpb']:.4f} |",
    ])


def _recipe(cfg) -> str:
    if cfg is None:
        return "No training config was saved with this model."
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    start = f"fine-tuned from `{m.pretrained}`" if m.pretrained else (
        f"initialised from `{m.init_from}`" if m.init_from else f"trained from scratch ({m.family}, hidden "
        f"{m.hidden_size}, {m.num_layers} layers, {m.num_heads} heads)")
    lora = f", LoRA rank {m.lora_rank}" if m.lora_rank else ""
    adapter = f", gated adapter rank {m.adapter_rank}" if m.adapter != "none" else ""
    return "\n".join([
        f"* {start}{lora}{adapter}; logit shift {m.logit_shift}, clean-stream attention `{m.clean_attention}`",
        f"* data: `{d.source}`, tokenizer `{d.tokenizer}`, context {d.max_seq_len} tokens, batch {d.batch_size}",
        f"* noise: `{cfg.noise.schedule}` schedule, t ~ U[{cfg.noise.beta}, {cfg.noise.omega}] in training",
        f"* optimiser: AdamW, lr {o.lr}, weight decay {o.weight_decay}, {o.warmup_steps} warm-up steps, "
        f"{o.lr_schedule} schedule, EMA {o.ema_decay}",
        f"* up to {t.max_steps} steps (`trainer.max_minutes={t.max_minutes}`), seed {t.seed}",
        "* the full resolved config: `train_config.yaml` in this folder",
    ])


def _sampler(model) -> str:
    g = model.generation_config
    parts = [f"sampler `{g.sampler}`", f"max_new_tokens {g.max_new_tokens}", f"temperature {g.temperature}"]
    if g.sampler == "threshold":
        parts.append(f"tau {g.tau}")
    if g.steps_per_block is not None:
        parts.append(f"steps_per_block {g.steps_per_block}")
    return ", ".join(parts)


def model_card(model, cfg=None, metrics: dict | None = None, name: str = "MODEL_DIR") -> str:
    """The card's text for ``model`` (a ``BlockDiffusionLM``) trained with ``cfg`` (``None``: unknown)."""
    spec = model.spec
    return "\n".join([
        _front_matter(cfg, model),
        "",
        f"# {name}",
        "",
        "A block diffusion language model made with blockdiff (the `blockdiff` Python package): "
        "autoregressive over blocks of "
        f"{spec.block_length} tokens, masked discrete diffusion inside each block, a KV cache over finished blocks.",
        "",
        "## Evaluation",
        "",
        _metrics_table(metrics),
        "",
        "## Model",
        "",
        f"* block length `L' = {spec.block_length}`, training context {spec.max_seq_len} tokens, mask token id "
        f"{spec.mask_token_id}, `{spec.schedule}` noise schedule",
        f"* generation defaults (`blockdiff_generation_config.json`): {_sampler(model)}",
        "",
        "## Training recipe",
        "",
        _recipe(cfg),
        "",
        "## Use",
        "",
        "```bash",
        "pip install blockdiff",
        f"blockdiff sample {name} --prompt \"Once upon a time\" --max-new-tokens 64",
        f"blockdiff serve {name}            # OpenAI-compatible HTTP API on 127.0.0.1:8000",
        "```",
        "",
        "```python",
        "from blockdiff import load_model_dir, sample_texts",
        "",
        f"loaded = load_model_dir({name!r})  # a local folder; BlockDiffusionLM.from_pretrained also takes a hub id",
        "texts, out = sample_texts(loaded.model, loaded.tokenizer, [\"Once upon a time\"], max_new_tokens=64)",
        "print(texts[0], out.sample_nfe)",
        "```",
        "",
        "This is a blockdiff model (`model_type: blockdiff` in `config.json`), not one transformers knows by itself: "
        "install blockdiff and `import blockdiff` before the Auto classes (or use `BlockDiffusionLM.from_pretrained`). "
        "Without it, transformers says it does not recognize the model type `blockdiff` and suggests upgrading "
        "transformers; upgrading does not help.",
        "",
        "```python",
        "import blockdiff  # registers the blockdiff model type with transformers' Auto classes",
        "from transformers import AutoModelForCausalLM",
        "",
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")  # or its hub id; a BlockDiffusionLM",
        "```",
        "",
    ])


def write_model_card(directory: str | Path, model, cfg=None, metrics: dict | None = None,
                     name: str | None = None) -> Path:
    """Write ``README.md`` into ``directory``; ``name`` is what the snippets call the folder (default: its name)."""
    path = Path(directory) / MODEL_CARD
    path.write_text(model_card(model, cfg, metrics, name or Path(directory).name), encoding="utf-8")
    return path
