"""Export the EMA teacher backbone as consolidated full tensors (``curate embed --model curate:PATH``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)

from catalog.paths import join
from training.models import VisionTransformer, ViTConfig, export_backbone
from training.models.config import InputSpec
from training.train.config import TrainConfig, vit_config
from training.train.dcp_reader import load_state
from training.train.meta_arch import build_student_teacher


def input_spec_of(config: TrainConfig) -> InputSpec:
    """The resolution the run scores its teacher at (``eval.image_size``, else the global crop), recorded in
    the export so `curate embed --model curate:FILE` needs no image size."""
    return InputSpec(size=config.eval.image_size or config.crops.global_size)


def _write(state: dict, config: ViTConfig, path: str, input_spec: InputSpec | None) -> str:
    with torch.device("meta"):
        model = VisionTransformer(dataclasses.replace(config, drop_path_rate=0.0))
    model.load_state_dict(state, strict=True, assign=True)
    return export_backbone(model, path, input_spec)


def export_teacher(
    backbone: nn.Module, config: ViTConfig, path: str, is_main: bool, *, subgroup: bool = False,
    input_spec: InputSpec | None = None,
) -> str | None:
    """Gather the (possibly FSDP-sharded) backbone; ``is_main`` writes it and returns its sha256.

    Collective over the backbone's mesh: every rank of it must call it. ``subgroup``: the mesh is a
    sub-group (a distillation student) whose writer need not be global rank 0, so every rank of it
    receives the full tensors (CPU offload keeps them on global rank 0 only).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=not subgroup)
    state = get_model_state_dict(backbone, options=options)
    if not is_main:
        return None
    return _write({k: v.detach().float() for k, v in state.items()}, config, str(path), input_spec)


def export_from_checkpoint(checkpoint: str, config: TrainConfig, path: str) -> str:
    """Export the teacher backbone of a saved training checkpoint (one process, any training world size)."""
    _, teacher = build_student_teacher(config.model, config.seed)
    state = {"teacher": get_model_state_dict(teacher)}
    load_state(state, checkpoint)
    prefix = "backbone."
    backbone = {k[len(prefix):]: v for k, v in state["teacher"].items() if k.startswith(prefix)}
    return _write(backbone, vit_config(config.model), str(path), input_spec_of(config))


def main(argv: list[str] | None = None) -> int:
    """``python -m training.train.export --config FILE --checkpoint DIR --out FILE [key=value ...]``."""
    import argparse

    from training.train.checkpoint import latest_checkpoint
    from training.train.config import load_train_config

    parser = argparse.ArgumentParser(prog="python -m training.train.export", description=export_from_checkpoint.__doc__)
    parser.add_argument("--config", required=True, help="the run's config (output_dir/config.yaml works)")
    parser.add_argument("--checkpoint", help="a checkpoint dir; default: the latest under output_dir/ckpt")
    parser.add_argument("--out", required=True, help="file to write (.safetensors)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = load_train_config(args.config, args.overrides)
    checkpoint = args.checkpoint or latest_checkpoint(join(config.output_dir, "ckpt"))
    if checkpoint is None:
        parser.error(f"no checkpoint under {config.output_dir}/ckpt")
    sha = export_from_checkpoint(checkpoint, config, args.out)
    print(f"wrote {args.out} (sha256 {sha}); embed with: curate embed --model curate:{args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
