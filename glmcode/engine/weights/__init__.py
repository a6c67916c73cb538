"""Checkpoint weights on disk: reading safetensors, naming, loading into the model."""
