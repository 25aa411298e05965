"""The backbone shipped with curate: trained by our trainer on a synthetic demo pool
(``training/configs/demo_cpu.yaml`` says how). Its file records its 64 px input, so it embeds in minutes
on 2 cores: the demo job's backbone, and a trial option on one's own pool (it knows only the demo's
synthetic concepts; on real photos it groups largely by colour)."""

from __future__ import annotations

import os

DEMO_BACKBONE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_backbone.safetensors")
# The embed settings that go with it, as `--set` lines of `curate embed` (build-lvd prefixes them `embed.`).
DEMO_EMBED_SETTINGS = [
    f"model=curate:{DEMO_BACKBONE}",
    "batch_size=128",
    "pooling=cls+mean",  # flatter curated sets than cls alone on the demo (docs/benchmarks.md)
]
DEMO_SETTINGS = [f"embed.{s}" for s in DEMO_EMBED_SETTINGS]
