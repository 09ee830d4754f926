"""Engine lifecycle for the rollout pool: start, readiness, failure, restart, kill (a mixin of RolloutPool)."""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from sage_megatron.procs import proc_start_time
from sage_megatron.rollout.errors import RolloutEngineError, short_error
from sage_megatron.rollout.placement import (alive_nodes, announce, cluster_lines, cpu_bind_plan, pinned_placement,
                                             plan_placement, ray_cluster_device)
from sage_megatron.rollout.vllm_engine import VLLMEngine
from sage_megatron.rollout.weight_transport import DEFAULT_BUCKET_BYTES, CpuObjectStoreTransport, iter_buckets


@dataclass
class EngineSlot:
    index: int
    actor: Any = None
    info: dict = field(default_factory=dict)   # from VLLMEngine.start(): pids, node id
    state: str = "stopped"                     # starting | ready | stopped | failed
    start_ref: Any = None
    started_at: float = 0.0
    version: int = 0
    restarts: int = 0                          # over the pool's lifetime
    last_error: str = ""


class EngineLifecycle:
    """RolloutPool's engine management; expects the pool's attributes (config, slots, device, ...)."""

    # ================================================================== engines: start, fail, restart
    def _detect_device(self) -> str:
        dev = self.config.engine.device
        if dev in ("cpu", "cuda"):
            return dev
        return ray_cluster_device()

    def _plan_cpu_binding(self) -> list[str | None]:
        cfg = self.config
        if self.device != "cpu" or cfg.engine.cpu_threads_bind or not cfg.split_cpu_cores or self._address:
            return [cfg.engine.cpu_threads_bind] * cfg.num_engines
        return cpu_bind_plan(sorted(os.sched_getaffinity(0)), num_engines=cfg.num_engines,
                             tensor_parallel_size=cfg.engine.tensor_parallel_size)

    def _make_placement_group(self):
        import ray
        from ray.util.placement_group import placement_group

        cfg = self.config
        if self.device == "cuda":
            per_engine, bundle = cfg.engine.tensor_parallel_size, {"GPU": 1, "CPU": cfg.cpus_per_engine}
        else:
            per_engine, bundle = 1, {"CPU": cfg.cpus_per_engine}
        nodes = alive_nodes(ray.nodes())
        if cfg.engine_ips:
            plan = pinned_placement(cfg.engine_ips, bundles_per_engine=per_engine, bundle=bundle, nodes=nodes)
        else:
            plan = plan_placement(cfg.placement, num_engines=cfg.num_engines, bundles_per_engine=per_engine,
                                  bundle=bundle, nodes=nodes)
        self._placement = plan
        if cfg.show_placement:
            for line in cluster_lines(ray.nodes()):
                announce(line)
            announce(f"placement {plan.placement} (asked: {cfg.placement}): {cfg.num_engines} engine(s), "
                      f"Ray strategy {plan.strategy}"
                      + (f", engine k on node {', '.join(n['ip'] for n in plan.engine_nodes)}"
                         if plan.placement == "planned" else
                         f", engine k on node {', '.join(n['ip'] for n in plan.nodes)} round-robin" if plan.nodes else ""))
        pg = placement_group(plan.bundles, strategy=plan.strategy)
        try:
            ray.get(pg.ready(), timeout=cfg.start_timeout_s)
        except Exception as exc:
            ray.util.remove_placement_group(pg)
            raise RuntimeError(f"cannot place {len(plan.bundles)} bundle(s) {plan.bundles} with {plan.strategy} "
                               f"(cluster resources: {ray.cluster_resources()}): {short_error(exc)}") from exc
        return pg

    def _launch(self, slot: EngineSlot) -> None:
        """Create the engine actor on its bundle(s) and start vLLM in it (asynchronously)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.config
        tp = cfg.engine.tensor_parallel_size
        options: dict[str, Any] = dict(max_concurrency=4, max_restarts=0)
        if self.device == "cuda":
            first = slot.index * tp
            bundle = first
            if tp == 1:
                options.update(num_cpus=cfg.cpus_per_engine, num_gpus=1)
            else:  # vLLM's Ray executor places its TP workers on this engine's bundles
                options.update(num_cpus=0, num_gpus=0, runtime_env={"env_vars": {
                    "VLLM_RAY_BUNDLE_INDICES": ",".join(str(first + i) for i in range(tp))}})
        else:
            bundle = slot.index
            options.update(num_cpus=cfg.cpus_per_engine, num_gpus=0)
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=self._pg, placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=True)
        engine_cfg = replace(self._engine_cfg, cpu_threads_bind=self._cpu_binds[slot.index])
        slot.actor = ray.remote(VLLMEngine).options(**options).remote(engine_cfg, engine_index=slot.index)
        slot.start_ref = slot.actor.start.remote()
        slot.started_at = time.monotonic()
        slot.state = "starting"
        slot.version = 0

    def _wait_ready(self, slots: list[EngineSlot]) -> None:
        """Block until ``slots`` are started: one line per engine, a heartbeat every 15 s."""
        import ray

        pending = {s.start_ref: s for s in slots}
        last_note = time.monotonic()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                self._on_started(pending.pop(ref))
            now = time.monotonic()
            if pending and now - last_note > 15:
                last_note = now
                names = ", ".join(f"{s.index} ({now - s.started_at:.0f} s)" for s in pending.values())
                self._say(f"waiting for engine(s) {names}; {len(slots) - len(pending)}/{len(slots)} ready")
            for s in pending.values():
                if now - s.started_at > self.config.start_timeout_s:
                    raise RolloutEngineError(
                        f"engine {s.index} not ready after {self.config.start_timeout_s:.0f} s (start_timeout_s); "
                        f"its vLLM output is in sage-engine-{s.index}-*.log under Ray's session logs folder "
                        f"(/tmp/ray/session_latest/logs)")

    def _on_started(self, slot: EngineSlot) -> None:
        import ray

        try:
            slot.info = ray.get(slot.start_ref)
        except Exception as exc:
            raise RolloutEngineError(f"engine {slot.index} failed to start: {short_error(exc, 2000)}") from exc
        slot.state, slot.start_ref = "ready", None
        self._say(f"engine {slot.index} ready in {time.monotonic() - slot.started_at:.1f} s "
                  f"(vLLM start {slot.info['seconds']:.1f} s, worker pid(s) {slot.info['worker_pids']})")
        if self.config.show_placement:
            node = next((n for n in alive_nodes(ray.nodes()) if n["node_id"] == slot.info.get("node_id")), None)
            where = f"{node['hostname']} ({node['ip']})" if node else f"node {slot.info.get('node_id')}"
            announce(f"engine {slot.index} on {where}, actor pid {slot.info.get('actor_pid')}, "
                      f"ready in {time.monotonic() - slot.started_at:.1f} s")

    def _fail(self, slot: EngineSlot, cause: str, restarts: Counter) -> None:
        """Kill a failed engine and launch its replacement, within the per-call restart budget."""
        slot.last_error = cause
        restarts[slot.index] += 1
        self._kill(slot, graceful=False)
        if restarts[slot.index] > self.config.max_restarts:
            slot.state = "failed"
            raise RolloutEngineError(
                f"engine {slot.index} failed {restarts[slot.index]} time(s) in one call "
                f"(max_restarts={self.config.max_restarts}); last cause: {cause}")
        slot.restarts += 1
        self._say(f"restarting engine {slot.index} (restart {restarts[slot.index]}/{self.config.max_restarts} "
                  f"this call)")
        self._launch(slot)

    def _advance_restarts(self, restarts: Counter) -> None:
        """Restarted engines that finished starting get the current weights, then become ready."""
        import ray

        for slot in self.slots:
            if slot.state != "starting":
                continue
            if not ray.wait([slot.start_ref], timeout=0)[0]:
                if time.monotonic() - slot.started_at > self.config.start_timeout_s:
                    self._fail(slot, f"restart not ready after {self.config.start_timeout_s:.0f} s", restarts)
                continue
            try:
                self._on_started(slot)
                self._restore(slot)
            except RolloutEngineError as exc:
                if "cannot restore" in str(exc):
                    raise
                self._fail(slot, f"restart failed: {short_error(exc)}", restarts)
            except Exception as exc:
                self._fail(slot, f"restart failed: {short_error(exc)}", restarts)

    def _recover_all(self) -> None:
        """Outside a call: bring every engine that is not ready back (restart + weights), or raise."""
        budget: Counter = Counter()
        for s in self.slots:
            if s.state in ("failed", "stopped"):
                self._fail(s, s.last_error or "engine not running", budget)
        while any(s.state == "starting" for s in self.slots):
            self._advance_restarts(budget)
            time.sleep(0.2)

    def _restore(self, slot: EngineSlot) -> None:
        """Give a (re)started engine the pool's current weights (always over the CPU path)."""
        import ray

        if self.version == 0:
            return
        actor = slot.actor
        # Host tensors also load into GPU engines. A re-stream goes through one-off files ("shm"): slot files
        # made for one engine's restore would stay mapped in its workers until their next update.
        payload = "shm" if self.config.transport.cpu_payload == "slots" else self.config.transport.cpu_payload
        cpu = CpuObjectStoreTransport(replace(self.config.transport, cpu_payload=payload))
        if self._kept_refs and self._kept_version == self.version:
            source = "the kept buckets of the last update"
            ray.get(actor.begin_update.remote())
            ray.get(cpu.replay(actor, self._kept_refs))
        elif self.restore_weights is not None:
            source = "restore_weights()"
            ray.get(actor.begin_update.remote())
            for bucket in iter_buckets(self.restore_weights(), bucket_bytes=DEFAULT_BUCKET_BYTES):
                ray.get(cpu.send_bucket([actor], bucket)[1])
        else:
            raise RolloutEngineError(
                f"engine {slot.index} restarted but the pool cannot restore weight version {self.version}: "
                f"set keep_last_weights=True (CPU transport) or pass restore_weights= to RolloutPool")
        ray.get(actor.finish_update.remote(version=self.version))
        slot.version = self.version
        if self._transport_name == "nccl":
            self.transport.teardown([])   # the transfer group is rebuilt with the new actor
        self._say(f"engine {slot.index} restored to weight version {self.version} from {source}")

    def _kill(self, slot: EngineSlot, *, graceful: bool) -> None:
        """Stop an engine: the actor, then any of its vLLM processes still alive (by recorded pid)."""
        import ray

        if slot.actor is None:
            return
        if graceful:
            try:
                ray.get(slot.actor.shutdown.remote(), timeout=30)
            except Exception:
                pass
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        if slot.info.get("child_pids"):
            _kill_pids(slot.info.get("node_id"), slot.info["child_pids"])
        slot.actor, slot.info, slot.start_ref, slot.state = None, {}, None, "stopped"


def _kill_pids(node_id: str | None, pids: list[tuple[int, str | None]]) -> None:
    """SIGKILL the recorded (pid, start time) processes on ``node_id``; skips recycled pids."""
    import ray

    if node_id is None or node_id == ray.get_runtime_context().get_node_id():
        _kill_local(pids)
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(_kill_local)
    try:
        ray.get(task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(pids),
                timeout=30)
    except Exception:
        pass


def _kill_local(pids: list[tuple[int, str | None]]) -> None:
    import signal

    for pid, started in pids:
        if started is None or proc_start_time(pid) != started:
            continue  # gone, or the pid now belongs to another process
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
