"""``python -m training.train --config FILE key.sub=value ...`` (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from training.train.config import load_train_config
from training.train.loop import TrainingDiverged, train


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description="DINOv3-style SSL pretraining")
    parser.add_argument("--config", help="YAML config (training/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    config = load_train_config(args.config, args.overrides)
    try:
        result = train(config)
    except TrainingDiverged as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"done: {result.steps_done} steps in {result.output_dir}"
          + (f", teacher exported to {result.teacher_path}" if result.teacher_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
