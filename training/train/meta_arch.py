"""Student and EMA teacher (ViT + DINO head + iBOT head) and the combined DINOv3 loss of one step."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from training.losses import (
    KoLeoDistributed,
    dino_loss,
    downsample_patch_tokens,
    gram_loss,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
)
from training.models import VisionTransformer, ViTConfig
from training.models.heads import DINOHead
from training.train.config import (
    GramConfig,
    HeadConfig,
    LossConfig,
    ModelConfig,
    vit_config,
)


class SSLModel(nn.Module):
    """One side of the self-distillation pair: backbone, DINO head (cls) and iBOT head (patches)."""

    def __init__(self, vit: ViTConfig, dino: HeadConfig, ibot: HeadConfig, seed: int) -> None:
        super().__init__()
        self.backbone = VisionTransformer(vit, seed=seed)
        self.dino_head = _head(vit.embed_dim, dino)
        self.ibot_head = _head(vit.embed_dim, ibot)
        if not self.backbone.cls_token.is_meta:
            self._init_heads(seed)

    @torch.no_grad()
    def _init_heads(self, seed: int) -> None:
        """Both heads from one private generator, so a seed gives the same model on every rank."""
        gen = torch.Generator().manual_seed(seed + 1)
        for head in (self.dino_head, self.ibot_head):
            head.reset_parameters(generator=gen)


def _head(in_dim: int, cfg: HeadConfig) -> DINOHead:
    return DINOHead(in_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.n_prototypes, cfg.n_layers)


def build_student_teacher(model: ModelConfig, seed: int) -> tuple[SSLModel, SSLModel]:
    """Student initialised from ``seed``; the teacher starts as an exact, gradient-free copy."""
    student = SSLModel(vit_config(model), model.dino_head, model.ibot_head, seed)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


FIELDS = ("total", "dino_local", "dino_global", "koleo", "ibot", "gram")


@dataclass
class StepLosses:
    total: Tensor
    dino_local: Tensor
    dino_global: Tensor
    koleo: Tensor
    ibot: Tensor
    gram: Tensor

    def stacked(self) -> Tensor:
        """The values (order of ``FIELDS``) as one detached float tensor, for a single all-reduce."""
        return torch.stack([getattr(self, name).detach().float() for name in FIELDS])




@torch.no_grad()
def teacher_targets(
    teacher: SSLModel, batch: dict, temp: float, n_global: int, loss: LossConfig, distributed: bool
) -> tuple[Tensor, Tensor]:
    """Sinkhorn-centred teacher targets: DINO ``[n_global, B, K]`` and iBOT at the masked tokens ``[M, K']``."""
    out = teacher.backbone(batch["global_crops"])
    cls_logits = teacher.dino_head(out["cls"])
    dino = sinkhorn_knopp(cls_logits, temp, loss.sinkhorn_iterations, distributed=distributed)
    masked = out["patches"].flatten(0, 1).index_select(0, batch["mask_indices"])
    ibot = sinkhorn_knopp(teacher.ibot_head(masked), temp, loss.sinkhorn_iterations, distributed=distributed)
    return dino.unflatten(0, (n_global, -1)), ibot


@dataclass(frozen=True)
class GramTerm:
    """The Gram-anchoring inputs of a step: the frozen Gram teacher backbone, this step's weight, the config."""

    teacher: nn.Module
    weight: float
    config: GramConfig


@torch.no_grad()
def gram_teacher_patches(gram_teacher: nn.Module, batch: dict, student_grid: tuple[int, int], patch_size: int) -> Tensor:
    """Gram-teacher output patch tokens of the global crops on the student's grid ``[n, P_S, D]``.

    With ``gram_teacher_crops`` in the batch (same crops at a higher resolution) the teacher runs on
    those and its tokens are resampled bicubically onto the student grid.
    """
    images = batch.get("gram_teacher_crops", batch["global_crops"])
    patches = gram_teacher(images)["patches"]
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    if grid != student_grid:
        patches = downsample_patch_tokens(patches, grid, student_grid)
    return patches


def ssl_losses(
    student: SSLModel,
    teacher: SSLModel,
    batch: dict,
    teacher_temp: float,
    loss: LossConfig,
    distributed: bool,
    generator: torch.Generator | None = None,
    gram: GramTerm | None = None,
    local_weight: float = 1.0,
) -> StepLosses:
    """The recipe's loss for one per-rank batch (crop-major crops, iBOT masks from the collate).

    total = w_dino·(local_weight·local·S_gS_l + global·S_g(S_g−1))/pairs + w_koleo·Σ_global-crops KoLeo(student cls)
    + w_ibot·iBOT (+ w_gram·Gram); the student sees the masked global crops, the teacher the unmasked ones.
    """
    n_global = batch["global_crops"].shape[0] // batch["image_ids"].shape[0]
    dino_targets, ibot_targets = teacher_targets(teacher, batch, teacher_temp, n_global, loss, distributed)
    return student_losses(
        student, batch, dino_targets, ibot_targets, loss, generator=generator, gram=gram, local_weight=local_weight
    )


def student_losses(
    student: SSLModel,
    batch: dict,
    dino_targets: Tensor,
    ibot_targets: Tensor,
    loss: LossConfig,
    *,
    generator: torch.Generator | None = None,
    gram: GramTerm | None = None,
    mask_student: bool = True,
    koleo_group: dist.ProcessGroup | None = None,
    local_weight: float = 1.0,
) -> StepLosses:
    """The student side of the loss given the teacher's centred targets.

    ``mask_student=False`` (distillation) feeds the unmasked global crops but keeps iBOT at the mask
    positions. With ``loss.koleo_group_size`` KoLeo neighbours come from groups of the global batch
    (over ``koleo_group``, default the world). The Gram term uses the student's output patch tokens of
    the global crops as fed (masked ones included, as the reference does).
    """
    global_crops, local_crops, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    n_images = batch["image_ids"].shape[0]
    n_global = global_crops.shape[0] // n_images
    n_local = local_crops.shape[0] // n_images

    g = student.backbone(global_crops, masks if mask_student else None, generator=generator)
    cls_tokens = [g["cls"]]
    if n_local:
        cls_tokens.append(student.backbone(local_crops, is_local=True, generator=generator)["cls"])
    logits = student.dino_head(torch.cat(cls_tokens))
    global_logits = logits[: n_global * n_images].unflatten(0, (n_global, n_images))
    local_logits = logits[n_global * n_images :].unflatten(0, (n_local, n_images))
    dino = dino_loss(global_logits, local_logits, dino_targets, loss.student_temp, local_weight=local_weight)

    if loss.koleo_group_size is None:
        koleo = sum(koleo_loss(c.float(), topk=loss.koleo_topk) for c in g["cls"].chunk(n_global))
    else:
        koleo_fn = KoLeoDistributed(loss.koleo_group_size, group=koleo_group, topk=loss.koleo_topk)
        koleo = sum(koleo_fn(c.float()) for c in g["cls"].chunk(n_global))
    masked = g["patches"].flatten(0, 1).index_select(0, batch["mask_indices"])
    ibot = ibot_loss(
        student.ibot_head(masked), ibot_targets, batch["masks_weight"], n_global * n_images, loss.student_temp
    )
    total = loss.dino_weight * dino.loss + loss.koleo_weight * koleo + loss.ibot_weight * ibot
    gram_value = total.new_zeros(())
    if gram is not None:
        patch = student.backbone.config.patch_size
        grid = (global_crops.shape[-2] // patch, global_crops.shape[-1] // patch)
        target = gram_teacher_patches(gram.teacher, batch, grid, patch)
        c = gram.config
        gram_value = gram_loss(g["patches"], target, c.img_level, c.reduction, c.remove_neg, normalized=c.normalized,
                               remove_only_teacher_neg=c.remove_only_teacher_neg)
        total = total + gram.weight * gram_value
    return StepLosses(total, dino.local, dino.global_, koleo, ibot, gram_value)


def cls_embeddings(backbone: nn.Module, images: Tensor) -> Tensor:
    """L2-normalised cls embeddings [B, D] (eval-mode forward of an FSDP or plain backbone)."""
    return F.normalize(backbone(images)["cls"].float(), dim=-1)
