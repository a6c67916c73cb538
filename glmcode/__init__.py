"""glmcode: a local coding assistant for GLM-4.7-Flash."""

__version__ = "0.1.0"
