"""Everything Megatron: layouts and process groups, the CPU/GPU device layer, model building
from HF configs, per-architecture weight maps, TP/PP gather/scatter and forward schedules."""
