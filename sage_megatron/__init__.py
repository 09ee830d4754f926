"""sage_megatron: a Megatron-core training backend for SAGE hinted GRPO (see README.md)."""
from sage_megatron import quiet as _quiet

_quiet.install()   # known-harmless library warnings, named one by one in quiet.py
