"""The embed driver's checks: a backbone file is judged by its header and key names, never its tensors,
and our exports carry their preprocessing."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pipelines.demo.job import DEMO_BACKBONE
from training.models import CheckpointError, export_backbone, load_backbone
from training.models.checkpoints import _FORMAT_V1, inspect_backbone
from training.models.config import MODEL_INPUTS, MODEL_SIZES, InputSpec
from training.models.vit import VisionTransformer


def test_inspection_reads_the_header_only(tmp_path):
    model = VisionTransformer(MODEL_SIZES["dinov3_vittest16"])
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: header + 16])  # every tensor's bytes gone but the first few
    spec = inspect_backbone("dinov3_vittest16", str(cut))
    assert spec.architecture == "dinov3_vittest16" and spec.weights == str(cut) and spec.input == InputSpec()
    with pytest.raises(CheckpointError, match="corrupt"):
        load_backbone("dinov3_vittest16", str(cut))
    with pytest.raises(CheckpointError, match="looks like"):  # the wrong size is still refused by key shapes
        inspect_backbone("dinov2_vittest14", str(path))


def test_exports_record_their_input_and_old_exports_get_the_default(tmp_path):
    model = VisionTransformer(MODEL_SIZES["vit_test"])
    new = tmp_path / "new.safetensors"
    export_backbone(model, new, InputSpec(size=48))
    assert inspect_backbone(f"curate:{new}", None).input == InputSpec(size=48)
    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old),
              metadata={_FORMAT_V1: model.config.to_json()})
    assert inspect_backbone(f"curate:{old}", None).input == InputSpec()  # 224 px, ImageNet mean/std
    assert torch.equal(load_backbone(f"curate:{old}", None)[0].cls_token, model.cls_token)


def test_the_shipped_demo_backbone_says_64_px_and_every_registry_entry_has_an_input():
    spec = inspect_backbone(f"curate:{DEMO_BACKBONE}", None)
    assert spec.architecture == "curate" and spec.input.size == 64 and spec.config.patch_size == 8
    assert set(MODEL_INPUTS) == set(MODEL_SIZES) and MODEL_INPUTS["vit_demo"].size == 64
    assert json.loads(json.dumps(spec.input.to_json()))["size"] == 64
