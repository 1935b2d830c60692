# posttrain: every target is a thin wrapper over the `posttrain` CLI.
# On a fresh machine, `make pipeline` or `make test` creates .venv first.
#
#   make pipeline            world -> base -> sft -> classify -> reward -> dpo -> ppo -> compare (each skipped when done)
#   make test                the default test suite (+ ruff), ~10 minutes
#   make <stage> RECIPE=...  one stage with another recipe (default: recipes/world/<stage>.yaml)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= 2.13.0
PT     := $(BIN)/posttrain

.DEFAULT_GOAL := help
.PHONY: help setup test test-slow lint pipeline world base clean

help:
	@echo "make pipeline   set up .venv, then run every stage on the built-in world"
	@echo "make test       set up .venv, then run the test suite and ruff"
	@echo "make test-slow  the long end-to-end tests (minutes each; installs DeepSpeed for the ZeRO ones)"
	@echo "make deepspeed  DeepSpeed in .venv, for ACCEL=zero2|zero3 (runs on a CPU too)"
	@echo "make compare-processes   1 vs 2 processes (GPUS=N) at the same global batch, every stage"
	@echo "make world      generate runs/world/data"
	@echo "make base       pretrain the world's base GPT (runs/world/base)"
	@echo "make compare    base vs SFT vs DPO vs PPO on the eval prompts (runs/world/compare)"
	@echo "make sft | classify | reward | dpo | ppo | grpo   one stage (RECIPE=..., GPUS=N, ACCEL=ddp|fsdp|zero2|zero3)"
	@echo "make rl         PPO, GRPO and RLOO on the gold verifier beside SFT and DPO (runs/world/rl)"
	@echo "make examples   SMS spam, Alpaca SFT, preference reward + DPO, GSM8K GRPO on ../shared/data (recipes/examples/)"
	@echo "make family     a Gemma 3 (FAMILY=qwen3: Qwen 3) base built offline, through every stage (runs/$(FAMILY))"
	@echo "make bench      speed vs a bare PyTorch loop, TRL and TRL 1.12's PPO, side by side (runs/bench/bench.md)"
	@echo "make bench-sharded   FSDP2 rollouts: weights gathered once vs per token (runs/bench/sharded_rollout.jsonl)"
	@echo "make clean      delete runs/ (keeps .venv)"

setup: $(VENV)/.installed

# torch first, so the project's torch range is already met and pip never pulls a multi-GB CUDA
# build onto a machine without a CUDA GPU. Without one: the CPU wheel from a local find-links
# folder, else from PyTorch's CPU index, else plain PyPI (macOS wheels are CPU-only anyway).
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch==$(TORCH) (CUDA build)"; \
		$(BIN)/pip install --quiet "torch==$(TORCH)"; \
	else \
		echo "no CUDA GPU: installing torch==$(TORCH) (CPU build)"; \
		$(BIN)/pip install --quiet "torch==$(TORCH)+cpu" 2>/dev/null \
		|| $(BIN)/pip install --quiet "torch==$(TORCH)+cpu" --extra-index-url https://download.pytorch.org/whl/cpu \
		|| $(BIN)/pip install --quiet "torch==$(TORCH)"; \
	fi
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest
	$(BIN)/ruff check posttrain tests

test-slow: setup deepspeed
	$(BIN)/python -m pytest -m slow

# DeepSpeed for recipes/accelerate/zero2.yaml and zero3.yaml (the slow tests run them on DeepSpeed's CPU
# accelerator). DS_BUILD_OPS=0 installs its Python code only: on a GPU it compiles the CUDA ops it
# needs when first used (that needs a CUDA toolkit).
DEEPSPEED ?= 0.19.8
.PHONY: deepspeed
deepspeed: $(VENV)/.deepspeed
$(VENV)/.deepspeed: $(VENV)/.installed
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet "deepspeed==$(DEEPSPEED)"
	touch $@

lint: setup
	$(BIN)/ruff check posttrain tests

# 1 process vs GPUS processes (default 2; on a CPU over gloo) at the same global batch, every stage:
# a loss table per stage in runs/compare_processes/compare.md (~5 minutes on 2 cores).
.PHONY: compare-processes
compare-processes: setup
	OMP_NUM_THREADS=1 $(BIN)/python scripts/compare_processes.py --processes $(if $(filter 1,$(GPUS)),2,$(GPUS))

# --- stages ---------------------------------------------------------------------------------------
# `make <stage>` runs recipes/world/<stage>.yaml (RECIPE=... for another) and first the stages it
# needs, each skipped when its run directory is done with the same recipe. GPUS=N launches N
# processes through `accelerate launch` with recipes/accelerate/$(ACCEL).yaml.

GPUS  ?= 1
ACCEL ?= ddp
ifeq ($(GPUS),1)
LAUNCH := $(PT)
else
LAUNCH := $(BIN)/accelerate launch --config_file recipes/accelerate/$(ACCEL).yaml --num_processes $(GPUS) -m posttrain.cli
endif
# With RECIPE given, prerequisites are yours to run: they may not be the world's.
needs = $(if $(RECIPE),setup,$(1))
recipe = $(if $(RECIPE),$(RECIPE),recipes/world/$(1).yaml)

.PHONY: sft classify reward dpo ppo grpo compare rl

world: setup
	$(PT) world $(call recipe,world)

base: $(call needs,world)
	$(LAUNCH) pretrain $(call recipe,base)

sft: $(call needs,base)
	$(LAUNCH) sft $(call recipe,sft)

classify: $(call needs,base)
	$(LAUNCH) classify $(call recipe,classify)

reward: $(call needs,sft)
	$(LAUNCH) reward $(call recipe,reward)

dpo: $(call needs,sft)
	$(LAUNCH) dpo $(call recipe,dpo)

ppo: $(call needs,reward)
	$(LAUNCH) ppo $(call recipe,ppo)

grpo: $(call needs,sft)
	$(LAUNCH) grpo $(call recipe,grpo)

# --- the whole pipeline on the built-in world ---------------------------------------------------------

# base, SFT, DPO and PPO answer the same eval prompts, scored by the gold verifier and the reward model.
compare: $(call needs,dpo ppo)
	$(PT) compare base=runs/world/base sft=runs/world/sft dpo=runs/world/dpo ppo=runs/world/ppo \
		--reward runs/world/reward --ref sft --out runs/world/compare

# Online RL on the gold verifier at one budget (1,280 sampled answers each): PPO, GRPO and RLOO, beside
# SFT and DPO (runs/world/rl/report.html).
rl: $(call needs,dpo grpo)
	$(LAUNCH) ppo recipes/world/ppo_gold.yaml
	$(LAUNCH) grpo recipes/world/rloo.yaml
	$(PT) compare sft=runs/world/sft dpo=runs/world/dpo ppo_gold=runs/world/ppo_gold grpo=runs/world/grpo \
		rloo=runs/world/rloo --ref sft --out runs/world/rl

pipeline: world base sft classify reward dpo ppo compare
	@echo "pipeline done: summaries in runs/world/*/summary.json, report in runs/world/compare/report.html"

# A base model of another family taken from "knows text" to "chats, is aligned" on the world, beside the
# world's GPT-2 (docs/real-checkpoints.md): FAMILY=gemma3 (default) or qwen3, built offline from its
# config by scripts/build_base.py, pretrained on the world corpus, then every stage with the family's
# own chat template; runs/$(FAMILY)/ (~30 minutes on 2 cores after `make world`).
FAMILY ?= gemma3
F       = runs/$(FAMILY)
FSET    = --set output_dir=$(F)/$(1)
.PHONY: family
family: world
	test -f $(F)/init/config.json || $(BIN)/python scripts/build_base.py --family $(FAMILY) --out $(F)/init
	$(PT) pretrain recipes/world/base.yaml --set model.path=$(F)/init --set model.config=null $(call FSET,base)
	$(PT) sft recipes/world/sft.yaml --set model.path=$(F)/base --set model.chat_template=null $(call FSET,sft)
	$(PT) classify recipes/world/classify.yaml --set model.path=$(F)/base $(call FSET,classify)
	$(PT) reward recipes/world/reward.yaml --set model.path=$(F)/sft $(call FSET,reward)
	$(PT) dpo recipes/world/dpo.yaml --set model.path=$(F)/sft $(call FSET,dpo)
	$(PT) ppo recipes/world/ppo.yaml --set model.path=$(F)/sft --set ppo.reward_model=$(F)/reward $(call FSET,ppo)
	$(PT) compare base=$(F)/base sft=$(F)/sft dpo=$(F)/dpo ppo=$(F)/ppo --reward $(F)/reward --ref sft --out $(F)/compare

clean:
	rm -rf runs

# Speed, measured side by side against a bare PyTorch loop, TRL used directly and TRL 1.12's PPOTrainer
# (in its own venv under runs/bench): runs/bench/bench.md and bench.json (~20 minutes after the pipeline).
.PHONY: bench bench-sharded
bench: pipeline
	$(BIN)/python -m posttrain.bench
	$(MAKE) bench-sharded

# PPO/GRPO rollouts under FSDP2 on 2 processes (gloo on a CPU): the policy gathered once per rollout
# against all-gathered again for every token, on a world-shaped GPT-2 and a GPT-2-small-shaped one
# built from configs: runs/bench/sharded_rollout.jsonl (~3 minutes on 2 cores).
SHARDED_ROLLOUT = OMP_NUM_THREADS=1 $(BIN)/accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \
	scripts/bench_sharded_rollout.py --out runs/bench/sharded_rollout.jsonl
bench-sharded: setup
	rm -f runs/bench/sharded_rollout.jsonl
	$(SHARDED_ROLLOUT) --layers 4 --width 192
	$(SHARDED_ROLLOUT) --layers 12 --width 768 --batch 4 --new-tokens 16

# --- examples on real data (../shared/data, see recipes/examples/) ---------------------------------
# SMS spam classification, Alpaca-style SFT, then a reward model and DPO on preference pairs from
# that SFT run; all start from the world's base GPT. Each is skipped when its run is done.
.PHONY: examples
examples: $(call needs,sft)
	$(LAUNCH) classify recipes/examples/sms_spam.yaml
	$(LAUNCH) sft recipes/examples/alpaca_sft.yaml
	$(LAUNCH) reward recipes/examples/pref_reward.yaml
	$(LAUNCH) dpo recipes/examples/pref_dpo.yaml
	$(LAUNCH) grpo recipes/examples/gsm8k_grpo.yaml
