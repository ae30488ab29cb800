"""FPET: faster parameter-efficient tuning of Vision Transformers by token merging."""
from fpet.model import build_model
from fpet.vit import TokenState, TokenViT

__version__ = "0.1.0"
__all__ = ["TokenState", "TokenViT", "build_model", "__version__"]
