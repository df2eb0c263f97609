"""Model families built from a checkpoint's config.json (one family per file)."""

from mixq.models.registry import SUPPORTED_ARCHITECTURES, build_model, load_model_weights

__all__ = ["SUPPORTED_ARCHITECTURES", "build_model", "load_model_weights"]
