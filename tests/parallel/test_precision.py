"""FP8 / dtype mapping onto TransformerConfig fields, checked without importing Transformer Engine."""
import pytest
import torch

from sage_megatron.parallel.precision import Fp8Options, parse_dtype, precision_config_kwargs


def test_bf16_without_fp8():
    assert precision_config_kwargs(dtype=torch.bfloat16, fp8=None, use_te=False) == {
        "params_dtype": torch.bfloat16, "pipeline_dtype": torch.bfloat16, "bf16": True, "fp16": False}


def test_fp8_delayed_hybrid():
    kw = precision_config_kwargs(dtype=torch.bfloat16, use_te=True,
                                 fp8=Fp8Options(format="hybrid", recipe="delayed", amax_history_len=16,
                                                amax_compute_algo="most_recent", margin=1))
    assert kw["fp8"] == "hybrid" and kw["fp8_recipe"] == "delayed"
    assert kw["fp8_amax_history_len"] == 16 and kw["fp8_amax_compute_algo"] == "most_recent"
    assert kw["fp8_margin"] == 1 and kw["fp8_param"] is False


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_fp8_current_scaling_recipes_have_no_amax_history(recipe):
    kw = precision_config_kwargs(dtype=torch.bfloat16, use_te=True, fp8=Fp8Options(format="e4m3", recipe=recipe))
    assert kw["fp8"] == "e4m3" and kw["fp8_recipe"] == recipe
    assert "fp8_amax_history_len" not in kw


def test_fp8_config_accepted_by_megatron_transformer_config():
    """The mapped names are real TransformerConfig fields (constructing it needs no TE)."""
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    kw = precision_config_kwargs(dtype=torch.bfloat16, use_te=True,
                                 fp8=Fp8Options(format="hybrid", recipe="delayed", first_last_layers_bf16=True))
    assert set(kw) <= fields


@pytest.mark.parametrize("opts,use_te,dtype,match", [
    (Fp8Options(format="e5m2"), True, torch.bfloat16, "fp8.format='e5m2'"),
    (Fp8Options(format="e4m3", recipe="mxfp8"), True, torch.bfloat16, "fp8.recipe='mxfp8'"),
    (Fp8Options(format="e4m3"), False, torch.bfloat16, "needs the Transformer Engine layer spec"),
    (Fp8Options(format="e4m3"), True, torch.float32, "set dtype=bfloat16"),
])
def test_fp8_bad_options(opts, use_te, dtype, match):
    with pytest.raises(ValueError, match=match):
        precision_config_kwargs(dtype=dtype, fp8=opts, use_te=use_te)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        parse_dtype("half")


def test_te_spec_without_transformer_engine_says_what_to_do():
    from sage_megatron.parallel.model import arch_from_hf_config, layer_spec
    from sage_megatron.parallel.precision import transformer_engine_available

    arch = arch_from_hf_config({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8,
                                "intermediate_size": 16, "num_attention_heads": 2, "vocab_size": 10})
    assert transformer_engine_available() is False  # CPU machine: TE cannot be installed here
    with pytest.raises(RuntimeError, match="NGC PyTorch container on a GPU node.*model.use_te=false"):
        layer_spec(arch, use_te=True)
    assert layer_spec(arch, use_te=False) is not None  # the local spec needs no TE
