"""sage_megatron: a Megatron-core training backend for SAGE hinted GRPO (see README.md)."""
import os as _os

from sage_megatron import quiet as _quiet

_quiet.install()   # known-harmless library warnings, named one by one in quiet.py

# Large host tensors on transparent huge pages: PyTorch's CPU allocator reads THP_MEM_ALLOC_ENABLE once, at its
# first large allocation, in every process that imports this package first (trainer ranks, engine actors and the
# vLLM processes they start). A weight sync allocates fresh host memory for every gathered tensor and, in the
# engines, every re-materialized layer; with 4 KiB pages each first touch faults (on the firecracker dev VM about
# 3 us per page: a fresh 113 MB copy 70 ms, 16 ms on huge pages). Set THP_MEM_ALLOC_ENABLE=0 to opt out.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
