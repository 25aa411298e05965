"""The recipe table of docs/recipe.md: every per-iteration value of each shipped 7B stage at key iterations.

The numbers come from our own schedule code (``training.train.schedules``, ``training.train.stages``)
applied to the shipped configs, so the doc cannot drift from the code: ``tests/training/test_recipe_doc.py``
regenerates the table and finds it in docs/recipe.md verbatim. The lr is scaled for 256 GPUs (the
reference's 7B layout) at each stage's images per GPU.

    .venv/bin/python benchmarks/recipe_table.py                # print the table
    .venv/bin/python benchmarks/recipe_table.py --write        # refresh docs/recipe.md
    .venv/bin/python benchmarks/recipe_table.py --out recipe.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from training.train.config import ScheduleConfig, TrainConfig, load_train_config
from training.train.schedules import Schedules, lr_scale
from training.train.stages import gram_weight

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("vit7b16_pretrain", "vit7b16_gram", "vit7b16_highres", "vit7b16_distill")
GPUS = 256
DOC = ROOT / "docs" / "recipe.md"
START, END = "<!-- recipe-table:start -->", "<!-- recipe-table:end -->"


def _rows_of(config: TrainConfig) -> dict[str, tuple[ScheduleConfig, Callable[[int], float]]]:
    """Each per-iteration value of the stage: its schedule (for the warmup length) and its value function."""
    o = config.optim
    global_batch = o.batch_size_per_rank * GPUS
    schedules = Schedules(o, global_batch, config.loss)
    rows = {
        f"lr (x{lr_scale(o.lr_scaling, global_batch):.3g})": (o.lr, lambda it: schedules.at(it).lr),
        "last-layer lr": (o.lr, lambda it: schedules.at(it).last_layer_lr),
        "weight decay": (o.weight_decay, lambda it: schedules.at(it).weight_decay),
        "teacher momentum": (o.momentum, lambda it: schedules.at(it).momentum),
        "teacher temperature": (o.teacher_temp, lambda it: schedules.at(it).teacher_temp),
        "local DINO weight": (config.loss.dino_local_weight, lambda it: schedules.at(it).dino_local_weight),
    }
    if config.stage in ("gram", "highres"):
        rows["Gram weight"] = (config.gram.weight, lambda it: gram_weight(config.gram, it, o.iterations))
    return rows


def table_rows() -> list[dict[str, str]]:
    rows = []
    for stage in STAGES:
        config = load_train_config(str(ROOT / "training" / "configs" / f"{stage}.yaml"))
        total = config.optim.iterations
        for name, (schedule, value) in _rows_of(config).items():
            warmup = schedule.warmup_iterations
            rows.append({
                "stage": f"{config.stage} ({total:,} its)", "value": name, "0": _fmt(value(0)),
                "end of warmup": f"{_fmt(value(warmup))} @ {warmup:,}", "1k": _fmt(value(1000)),
                "10k": _fmt(value(10_000)), "mid": _fmt(value(total // 2)), "last": _fmt(value(total - 1)),
            })
    return rows


def markdown_table() -> str:
    rows = table_rows()
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "0" if v == 0 else f"{v:.4g}"


def write_doc(path: Path = DOC) -> None:
    text = path.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{START}\n{markdown_table()}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"replace the table in {DOC.relative_to(ROOT)}")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    print(markdown_table())
    if args.write:
        write_doc()
    if args.out:
        Path(args.out).write_text(json.dumps({"gpus": GPUS, "rows": table_rows()}, indent=2))


if __name__ == "__main__":
    main()
