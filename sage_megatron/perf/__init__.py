"""Analytic performance model of one hinted-GRPO step (rollout, hint rollouts, log-prob passes,
policy update, weight sync), in three modules: `catalogue` holds the inputs that describe the
machine and the model (`Hardware` with the `H100_SXM` and `CPU_THIS_MACHINE` peaks,
`measure_cpu_hardware`, `ModelSpec` and the `MODELS` presets); `formulas` holds the pure math
(`Efficiency`, `Layout`, `Workload`, the per-phase times, `step_time`, `best_layout`,
`predict_table`, `compare_published`); `cli` is the command line (`python -m
sage_megatron.perf.cli [--compare | --model M --nodes N --tp T --pp P]`) that prints the tables of
docs/perf_model.md. Import from the submodule that holds a name; this package re-exports nothing.
"""
