"""SSL losses of the DINOv3 recipe: DINO, iBOT, KoLeo, Gram, and Sinkhorn-Knopp teacher centering."""

from training.losses.dino import (
    DINOLossOutput,
    dino_cross_entropy,
    dino_loss,
    dino_term_weights,
)
from training.losses.gram import downsample_patch_tokens, gram_loss
from training.losses.ibot import ibot_loss, masked_token_weights
from training.losses.koleo import KoLeoDistributed, koleo_loss
from training.losses.sinkhorn import sinkhorn_knopp

__all__ = [
    "DINOLossOutput",
    "KoLeoDistributed",
    "dino_cross_entropy",
    "dino_loss",
    "dino_term_weights",
    "downsample_patch_tokens",
    "gram_loss",
    "ibot_loss",
    "koleo_loss",
    "masked_token_weights",
    "sinkhorn_knopp",
]
