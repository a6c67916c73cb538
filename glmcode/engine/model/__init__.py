"""The one GLM-4.7-Flash model definition, which every execution path runs."""

from glmcode.engine.model.decoder import DecoderLayer, GlmMoeLite, build_model

__all__ = ["DecoderLayer", "GlmMoeLite", "build_model"]
