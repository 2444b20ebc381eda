"""Built-in architectures, registered by name. Their tensor names follow the conventions that
``rebasin.spec.names`` recognizes, so their checkpoints merge without model code."""

from rebasin.models.registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
