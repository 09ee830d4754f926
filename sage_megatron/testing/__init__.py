"""Test and benchmark helpers that build real (tiny) artefacts: models, tokenizers, clusters."""
