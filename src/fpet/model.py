"""`build_model(cfg)`: backbone -> PET injection -> merge schedule -> freezing (DESIGN section 3)."""
from __future__ import annotations

from omegaconf import DictConfig

from fpet.backbone import create_backbone
from fpet.merge import build_merges
from fpet.pet import inject_pet, set_trainable
from fpet.vit import TokenViT


def build_model(cfg: DictConfig) -> TokenViT:
    """The complete model for a composed train config; `cfg.dataset.num_classes` sizes the head.

    The timm `VisionTransformer` is `model.vit`; PET layers are injected into it by module replacement; merge
    strategies sit in `model.merges` keyed by block index; only PET, head and merge parameters require grad
    (`pet.trainable` changes that for full fine-tuning and linear probing).
    """
    vit, pre_logits = create_backbone(cfg.backbone, num_classes=cfg.dataset.num_classes)
    inject_pet(vit, cfg.pet)
    model = TokenViT(vit, build_merges(cfg.merge, vit), pre_logits=pre_logits)
    set_trainable(model, cfg.pet.get("trainable", "pet"))
    return model
