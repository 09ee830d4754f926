"""The Megatron actor / reference: batch building (batch.py), vocab-parallel log-probs (logprobs.py), the rank worker (worker.py)."""
