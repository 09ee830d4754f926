"""Megatron-core GPTModel built from an HF config (Llama 3.x, Qwen2/2.5, Qwen3).

``ModelArch`` is the pure description read from config.json; ``transformer_config`` maps it onto
megatron-core's TransformerConfig; ``build_gpt_model`` builds this rank's pipeline stage with the
local layer spec (CPU) or the Transformer Engine spec (GPU, FP8 capable).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sage_megatron.parallel.layout import ParallelLayout, padded_vocab_size
from sage_megatron.parallel.precision import Fp8Options, precision_config_kwargs, require_te_for
from sage_megatron.parallel.rope import Llama3RopeScaling, llama3_inv_freq

# HF architecture name -> family key used by the weight maps.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelArch:
    """Everything about a decoder-only model that the Megatron build and the weight maps need."""

    family: str                 # "llama" | "qwen2" | "qwen3"
    hf_architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int       # key/value heads
    head_dim: int               # kv_channels; Qwen3 sets it independently of hidden/heads
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_llama3: Llama3RopeScaling | None   # "llama3" rope scaling (any factor/low/high/original), None if unscaled
    tie_word_embeddings: bool
    qkv_bias: bool              # Qwen2
    qk_norm: bool               # Qwen3

    @property
    def q_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --hf-dir must be a Hugging Face checkpoint folder with config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-export the checkpoint's config") from None


def arch_from_hf_config(cfg: dict, *, source: str = "config.json") -> ModelArch:
    """Read a ModelArch from an HF config dict; unsupported features raise with a list of what is."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}. "
            "Convert a model of one of these families, or add a weight map in sage_megatron/parallel/weight_maps.py."
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    llama3 = None
    if rope_type == "llama3":
        # Any factor/low/high/original: _gpt_model hands megatron the inverse frequencies computed as HF does.
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if rope.get(k) is None]
        if missing:
            raise UnsupportedModelError(f"{source}: llama3 rope scaling lacks {', '.join(missing)} "
                                        "(transformers requires factor, low_freq_factor and high_freq_factor)")
        llama3 = Llama3RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            # transformers' standardize_rope_params falls back to max_position_embeddings
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings")
                                                 or cfg.get("max_position_embeddings", 4096)))
    elif rope_type != "default":
        raise UnsupportedModelError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                                    "default, llama3 (any factor, low/high_freq_factor, original_max_position_embeddings)")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(f"{source}: partial_rotary_factor={partial} is not supported (only 1.0)")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
    if family == "llama" and cfg.get("attention_bias"):
        raise UnsupportedModelError(f"{source}: attention_bias=true is not supported for Llama")
    if family == "qwen3" and cfg.get("attention_bias"):
        raise UnsupportedModelError(f"{source}: attention_bias=true is not supported for Qwen3")
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    return ModelArch(
        family=family,
        hf_architecture=arch,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_llama3=llama3,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
    )


def transformer_config(
    arch: ModelArch,
    *,
    layout: ParallelLayout,
    dtype: torch.dtype = torch.float32,
    use_te: bool = False,
    fp8: Fp8Options | None = None,
    on_gpu: bool = False,
):
    """The megatron-core TransformerConfig for ``arch`` at ``layout``.

    Fusions that need CUDA kernels are off on CPU; dropout is off (RL fine-tuning).
    """
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        sequence_parallel=False,
        # the actor's micro-batches differ in rows and length (actor.batch.plan_micro_batches): pipeline
        # stages exchange each activation's shape before sending it. megatron refuses that with its default
        # MoE dispatcher ("allgather"), even for a dense model that builds none; "alltoall" supports it.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,      # weights always come from a checkpoint
        bias_activation_fusion=on_gpu and use_te,
        bias_dropout_fusion=on_gpu and use_te,
        masked_softmax_fusion=on_gpu and use_te,
        persist_layer_norm=on_gpu and use_te,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        batch_p2p_sync=on_gpu,
        attention_softmax_in_fp32=True,
        **precision_config_kwargs(dtype=dtype, fp8=fp8, use_te=use_te),
    )


def layer_spec(arch: ModelArch, *, use_te: bool):
    """Local spec on CPU; Transformer Engine spec on GPU (imports TE only when asked for)."""
    if use_te:
        require_te_for(use_te=True)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")


def build_gpt_model(
    arch: ModelArch,
    *,
    layout: ParallelLayout,
    padded_vocab: int | None = None,
    dtype: torch.dtype = torch.float32,
    use_te: bool = False,
    fp8: Fp8Options | None = None,
):
    """Build this rank's pipeline stage of the GPTModel (parallel state must be initialised)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from sage_megatron.parallel.device import cuda_available, on_cpu_if_needed

    on_gpu = cuda_available()
    config = transformer_config(arch, layout=layout, dtype=dtype, use_te=use_te, fp8=fp8, on_gpu=on_gpu)
    # language_module.setup_embeddings_and_output_layer moves the tied weight with .cuda() (pp > 1).
    with on_cpu_if_needed():
        model = _gpt_model(GPTModel, parallel_state, config, arch, layout, padded_vocab, use_te)
    mark_tensor_parallel_params(model)
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    if config.bf16 or config.fp16:
        # megatron-core's way (Megatron-LM's get_model): Float16Module casts the module itself (Transformer
        # Engine's FP8 parameters keep their FP8 storage), feeds the first stage half-precision inputs and
        # returns fp32 logits from the last stage. No blanket .to(dtype) over FP8 parameters.
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return model


def _gpt_model(GPTModel, parallel_state, config, arch, layout, padded_vocab, use_te):
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te=use_te),
        vocab_size=padded_vocab or padded_vocab_size(arch.vocab_size, tp=layout.tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        rope_scaling=False,     # llama3 scaling: set below (megatron-core hard-codes low 1, high 4, original 8192)
    )
    if arch.rope_llama3 is not None:
        set_rotary_inv_freq(model, llama3_inv_freq(arch.rope_llama3, head_dim=arch.head_dim, theta=arch.rope_theta))
    return model


def set_rotary_inv_freq(model, inv_freq: torch.Tensor) -> None:
    """Give this stage's megatron RotaryEmbedding the inverse frequencies ``inv_freq``.

    Every pipeline stage builds its own ``rotary_pos_emb`` (GPTModel.__init__). Its ``inv_freq`` is a
    plain attribute (not a buffer: ``model.to(dtype)`` / ``.cuda()`` leave it alone), float32, on
    "cpu" under use_cpu_initialization else on torch.cuda.current_device(); the replacement keeps that
    dtype and device. ``RotaryEmbedding.forward`` is lru_cached per (module, seq len): this must run
    before the first forward, as it does here, right after construction.
    """
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        raise UnsupportedModelError("llama3 rope scaling needs megatron's RotaryEmbedding (position_embedding_type rope)")
    old = rotary.inv_freq
    if old.shape != inv_freq.shape:
        raise ValueError(f"rotary inv_freq shape {tuple(inv_freq.shape)} != megatron's {tuple(old.shape)}")
    rotary.inv_freq = inv_freq.to(device=old.device, dtype=old.dtype)


def arch_to_json(arch: ModelArch) -> dict:
    return asdict(arch)


def arch_from_json(raw: dict) -> ModelArch:
    """Inverse of ``arch_to_json``; also reads metadata written before ``rope_llama3`` existed, whose
    ``rope_llama3_factor`` meant megatron-core's hard-coded Llama 3.1 values (low 1, high 4, original 8192)."""
    raw = dict(raw)
    if "rope_llama3_factor" in raw:
        factor = raw.pop("rope_llama3_factor")
        raw.setdefault("rope_llama3", None if factor is None else asdict(Llama3RopeScaling.llama31(factor)))
    rope = raw.get("rope_llama3")
    raw["rope_llama3"] = Llama3RopeScaling(**rope) if isinstance(rope, dict) else rope
    return ModelArch(**raw)


def mark_tensor_parallel_params(model) -> int:
    """Set megatron's tensor_model_parallel / partition_dim attributes where the build left them unset.

    megatron-core sets them only inside its weight initialisers, which ``build_gpt_model`` skips
    (perform_initialization=False: weights come from a checkpoint). Without them
    ``param_is_not_tensor_parallel_duplicate`` treats every shard as a TP replica and the optimizer's
    grad norm (hence clipping) at tp > 1 counts TP rank 0's shards only. Column-parallel layers and
    the vocab-parallel embedding split dim 0 (weight and bias), row-parallel layers dim 1 (weight
    only; their bias is replicated). Returns the number of parameters marked.
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    def mode_of(module) -> str | None:
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            return "column"
        if isinstance(module, RowParallelLinear):
            return "row"
        return getattr(module, "parallel_mode", None)     # Transformer Engine linears: "column" / "row"

    marked = 0
    for module in model.modules():
        mode = mode_of(module)
        if mode not in ("column", "row"):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if hasattr(param, "tensor_model_parallel"):
                continue
            if pname == "weight" or (pname == "bias" and mode == "column"):
                param.tensor_model_parallel = True
                param.partition_dim = 0 if mode == "column" else 1
                param.partition_stride = 1
                marked += 1
    return marked
