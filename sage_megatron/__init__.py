"""sage_megatron: Megatron-core backend for SAGE hinted GRPO."""
