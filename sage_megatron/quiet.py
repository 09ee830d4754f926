"""The known-harmless library warnings, silenced by name in one place (imported by sage_megatron/__init__.py,
so every process of ours gets them: the CLI, spawned ranks, Ray actors, vLLM workers).

Each entry names the library message and why it is harmless here; any other warning stays visible.
Delete an entry when the library stops emitting it or when it starts to matter.
"""
from __future__ import annotations

import warnings

# (category, message regex matched at the start of the message, why it is harmless)
KNOWN_HARMLESS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back",
     "megatron-core on CPU (no TE/Apex): the local torch implementations are the intended path here"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
     "megatron-core's local layer spec without Apex uses torch norms, as intended on CPU"),
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope",
     "megatron-core 0.16 TransformerConfig default; CUDA graphs are off in our configs"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed",
     "megatron-core 0.16 dist_checkpointing calls torch.distributed.checkpoint.load_state_dict"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     "torch.distributed.checkpoint about megatron-core 0.16's ShardedTensor use"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated",
     "emitted by library imports (vLLM, transformers), not by our code"),
    (DeprecationWarning, r"The following imports from `dynamic_context\.py` will be removed",
     "megatron-core 0.16's own inference package import"),
    (DeprecationWarning, r"\s*The 'megatron\.core\.transformer\.custom_layers\.transformer_engine'",
     "megatron-core 0.16 imports its own deprecated module when TE specs are probed"),
)


def install() -> None:
    """Add one 'ignore' filter per known-harmless warning (idempotent: warnings dedupes equal filters)."""
    for category, message, _why in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
