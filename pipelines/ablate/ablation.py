"""``curate ablate``: the same recipe trained on each arm's data, every run scored alike, one table.

Phases, each resumable: *prepare* builds the arms' parts and the evaluation sets and records the plan
(``plan.json``: a rerun with another config or recipe is refused); *arms* trains and scores every
run that has no ``scores.json`` yet; *report* scores the ``untrained`` reference row (the teacher
every arm starts from, per seed) and writes the table. On a Ray cluster (an ``http://``
address) each phase is a Ray job and the arms' jobs run at the same time, as far as the cluster's
resources allow (each arm trains through Ray Train, which waits for its workers' resources).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

import torch

from catalog.config import ConfigError, to_dict
from catalog.manifest import fingerprint
from catalog.paths import exists, join, read_bytes, write_bytes_atomic
from pipelines.ablate.arms import build_parts, data_overrides, fill, part_sources, parts_in_place
from pipelines.ablate.config import UNTRAINED, AblationConfig
from pipelines.ablate.runs import (
    Run,
    ablation_dir,
    base_config,
    read_scores,
    run_dir,
    score,
    score_untrained,
    shortened,
    train,
)
from pipelines.ablate.table import markdown, summarise, write_results
from training.evals.suite import EvalSuite, EvalSuiteConfig
from training.train.config import TrainConfig, load_train_config

PLAN_FILE = "plan.json"
PHASES = ("prepare", "report")  # with arm:<name>, what --only accepts


@dataclass(frozen=True)
class Plan:
    folder: str
    config_file: str
    runs: list[Run]
    evals: EvalSuiteConfig
    image_size: int
    part_sizes: dict[str, int]
    references: list[Run]  # the untrained row's runs, one per seed: scored, never trained


def _recipe(config_file: str, config: AblationConfig) -> tuple[TrainConfig, list[str]]:
    """The recipe every arm shares and the overrides that make it (the ablation's, then the schedule's)."""
    base = load_train_config(config_file, config.train)
    if base.stage != "pretrain":
        raise ConfigError(f"an ablation compares pretraining runs; {config_file} is a {base.stage!r} stage")
    overrides = [*config.train, *(shortened(base, config.steps) if config.steps else [])]
    return load_train_config(config_file, overrides), overrides


def _eval_config(root: str, config: AblationConfig) -> EvalSuiteConfig:
    """The configured evaluation paths; with a demo pool, its sets fill every path left empty."""
    evals = replace(config.evals, **{k: fill(v, root) for k, v in to_dict(config.evals).items() if isinstance(v, str)})
    if not config.demo_pool:
        return evals
    from pipelines.demo.eval_sets import write_eval_sets

    demo = write_eval_sets(fill(config.demo_pool, root))
    return replace(demo, **{k: v for k, v in to_dict(evals).items() if v != getattr(EvalSuiteConfig(), k)})


def prepare(root: str, config_file: str, config: AblationConfig, address: str | None = None) -> Plan:
    """Build the parts and evaluation sets once and record the plan; a later call checks it and reuses them."""
    folder = ablation_dir(root, config.name)
    recipe, overrides = _recipe(config_file, config)
    planned = {"ablation": to_dict(config), "recipe": base_config(recipe)}
    plan_url = join(folder, PLAN_FILE)
    if exists(plan_url):
        doc = json.loads(read_bytes(plan_url))
        if doc["fingerprint"] != fingerprint(planned):
            raise ConfigError(f"ablation {config.name!r} in {folder} was started with another ablation config or "
                             "recipe: rerun it with the same settings, choose another --name, or delete the folder")
        sizes = doc["parts"]
        if not parts_in_place(root, sizes):  # another ablation's parts replaced them since
            print("== ablate: its parts were replaced by another ablation's: building them again ==", flush=True)
            rebuilt = build_parts(root, part_sources(config.arms, root), address)
            if rebuilt != sizes:
                raise ConfigError(f"ablation {config.name!r}: its parts rebuilt from this catalog hold {rebuilt} "
                                  f"images, its runs trained on {sizes}: the catalog changed since; choose "
                                  "another --name, or delete the folder")
    else:
        sizes = build_parts(root, part_sources(config.arms, root), address)
        doc = {**planned, "fingerprint": fingerprint(planned), "config_file": config_file, "parts": sizes}
    evals = _eval_config(root, config)
    write_bytes_atomic(plan_url, json.dumps({**doc, "evals": to_dict(evals)}, indent=2).encode())
    def run(arm: str, seed: int, data: list[str]) -> Run:
        out = run_dir(root, config.name, arm, seed)
        return Run(arm, seed, out, [*overrides, *data, f"seed={seed}", f"output_dir={json.dumps(out)}"])

    runs = [run(arm, seed, data_overrides(root, spec, sizes)) for arm, spec in config.arms.items()
            for seed in config.seeds]
    references = [run(UNTRAINED, seed, []) for seed in config.seeds] if config.untrained else []
    image_size = config.image_size or recipe.eval.image_size or recipe.crops.global_size
    return Plan(folder, config_file, runs, evals, image_size, sizes, references)


def run_arms(plan: Plan, arms: list[str] | None = None, num_workers: int = 1, gpus_per_worker: float = 0,
             address: str | None = None) -> None:
    """Train and score every unfinished run (of ``arms`` only, when given), the evaluation sets loaded once."""
    runs = [r for r in plan.runs if arms is None or r.arm in arms]
    todo = [r for r in runs if not r.finished]
    for r in runs:
        if not r.finished:
            continue
        print(f"== ablate: {r.arm} seed {r.seed}: finished earlier ({r.out}) ==", flush=True)
    if not todo:
        return
    suite = EvalSuite(plan.evals, plan.image_size)
    for r in todo:
        config = r.config(plan.config_file)
        print(f"\n== ablate: {r.arm} seed {r.seed}: {config.optim.iterations} steps on "
              f"{config.data.parts or 'the mix'} -> {r.out} ==", flush=True)
        manifest = train(config, num_workers, gpus_per_worker, address)
        doc = score(r, manifest, suite)
        print(f"{r.arm} seed {r.seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in doc["scores"].items()), flush=True)


def report(plan: Plan, config: AblationConfig, started: float | None = None) -> dict:
    """The table over every run (all must be finished); written beside the runs and printed."""
    missing = [f"{r.arm}/seed{r.seed}" for r in plan.runs if not r.finished]
    if missing:
        raise ConfigError(f"runs not finished yet: {', '.join(missing)}; rerun `curate ablate` to finish them")
    unscored = [r for r in plan.references if not r.finished]
    if unscored:  # seconds: no training, the evaluation sets only
        suite = EvalSuite(plan.evals, plan.image_size)
        for r in unscored:
            score_untrained(r, r.config(plan.config_file), suite)
    scores = [read_scores(r) for r in plan.runs]
    arms = [UNTRAINED, *config.arms] if plan.references else list(config.arms)
    summary = summarise(config.name, [*map(read_scores, plan.references), *scores], arms, list(scores[0]["scores"]))
    summary |= {
        "untrained": bool(plan.references), "config_file": plan.config_file, "part_sizes": plan.part_sizes,
        "seeds": config.seeds, "steps": scores[0]["steps"], "evals": to_dict(plan.evals),
        "train_seconds_total": round(sum(s["train_seconds"] for s in scores), 1),
        "load_average_1m": [s["load_average_1m"] for s in scores],
        "machine": {"host": os.uname().nodename, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    if started is not None:
        summary["wall_seconds_this_invocation"] = round(time.time() - started, 1)
    urls = write_results(plan.folder, summary)
    print("\n" + markdown(summary) + "\n" + "\n".join(urls), flush=True)
    return summary


def _wait_jobs(jobs: dict[str, str], address: str, poll_s: float = 2.0) -> dict[str, str]:
    """Poll the arms' jobs until each has ended; prints every change of status; returns arm -> final status."""
    from pipelines.cli.jobs import TERMINAL, status

    last: dict[str, str] = {}
    while True:
        for arm, job_id in jobs.items():
            state = status(job_id, address)["status"]
            if last.get(arm) != state:
                print(f"arm {arm}: job {job_id} {state}", flush=True)
                last[arm] = state
        if all(s in TERMINAL for s in last.values()):
            return last
        time.sleep(poll_s)


def run_as_jobs(address: str, argv: list[str], arms: list[str]) -> None:
    """Prepare, then every arm at once, then the report: each a Ray job running ``curate ARGV --only PHASE``."""
    from pipelines.cli.jobs import RESUME_HINT, JobError, submit

    submit([*argv, "--only", "prepare"], address)
    jobs = {arm: submit([*argv, "--only", f"arm:{arm}"], address, wait=False) for arm in arms}
    final = _wait_jobs(jobs, address)
    failed = {arm: jobs[arm] for arm, state in final.items() if state != "SUCCEEDED"}
    if failed:
        raise JobError(f"arms {', '.join(f'{a} (job {j} {final[a]})' for a, j in failed.items())} did not finish "
                       f"(curate jobs logs JOB_ID shows why); {RESUME_HINT}")
    submit([*argv, "--only", "report"], address)


def ablate(root: str, config_file: str, config: AblationConfig, *, only: str | None = None, address: str | None = None,
           num_workers: int = 1, gpus_per_worker: float = 0, job_argv: list[str] | None = None) -> dict | None:
    """Run the ablation (or one phase of it, ``only``); returns the summary when the report was written.

    ``address``: an ``http://`` job server runs the phases as Ray jobs (``job_argv`` is the command they
    run); any other address is the Ray cluster the training and retrieval use.
    """
    from pipelines.cli.jobs import is_job_address

    if only is not None and only not in PHASES and not (only.startswith("arm:") and only[4:] in config.arms):
        raise ConfigError(f"--only takes prepare, report or arm:<name> with an arm of {sorted(config.arms)}, "
                         f"not {only!r}")
    if is_job_address(address):
        run_as_jobs(address, job_argv or [], list(config.arms))
        return None
    started = time.time()
    plan = prepare(root, config_file, config, address)
    if only in (None, *(f"arm:{a}" for a in config.arms)):
        run_arms(plan, None if only is None else [only[4:]], num_workers, gpus_per_worker, address)
    if only in (None, "report"):
        return report(plan, config, started)
    return None
