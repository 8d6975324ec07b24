"""``diffora compare``: plan the jobs, check every option and the data before the first one, run them in worker
processes, keep ``OUT/results.json`` up to date after every job, and write the report.

Rerunning the same command in the same ``--output-dir`` keeps every finished job and runs only the rest (failed,
skipped or interrupted ones, and jobs of methods or seeds added since). ``--overwrite`` starts over.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Optional

from ..cli.options import Options, with_new_defaults
from ..errors import ConfigError, DataError
from ..method.schedule import check_warmup, gate_warmup
from ..store.io import atomic_write_json
from .data import Prepared, load_split, prepared
from .methods import Method, Validation, parse_methods, search_key, search_label
from .settings import CompareOptions

RESULTS_FORMAT = "diffora.compare/1"
RESULTS_FILE = "results.json"
DEFAULT_OUTPUT_DIR = "runs/compare"
#: options that may change between an interrupted comparison and its rerun
VOLATILE = ("output_dir", "overwrite", "quiet", "threads", "resume", "checkpoint_every", "seed")
#: options of ``diffora run`` that compare cannot honour yet (the search API it builds on has no hook for them):
#: option -> (the value compare supports, why). Lifting one needs the search job (jobs.run_search / build_model) to
#: do what pipeline's search does for it.
#: what a compare output folder holds (--overwrite removes only these)
OUTPUT_NAMES = ("results.json", "report.md", "curves.png", "score_vs_params.png", "searches")


# ---------------------------------------------------------------------------------------------------- API
def compare(
    options: Optional[Options] = None,
    settings: Optional[CompareOptions] = None,
    *,
    command: Optional[str] = None,
    **kwargs: Any,
) -> dict:
    """Compare DiffoRA with LoRA, AdaLoRA, EVA and random module selection on one task; returns ``results.json``.

    ``options`` holds the data, model and training options (as ``diffora run``), ``settings`` the comparison's own
    (methods, seeds, workers…). Keyword arguments set fields of either, e.g.::

        compare(task="classification", train_file="train.csv", eval_file="dev.csv", methods=["diffora", "lora-all"],
                seeds=[0, 1, 2], output_dir="runs/cmp")

    Writes ``OUTPUT_DIR/results.json``, ``report.md``, ``curves.png``, ``score_vs_params.png`` and a DAM heatmap per
    search. Input problems raise :class:`~diffora.errors.ConfigError`/:class:`~diffora.errors.DataError` before the
    first job.
    """
    option_names = {f.name for f in fields(Options)}
    setting_names = {f.name for f in fields(CompareOptions)}
    unknown = sorted(set(kwargs) - option_names - setting_names)
    if unknown:
        raise ConfigError(
            f"compare() got unknown option(s) {unknown}; options are the fields of diffora.cli.options.Options "
            "and diffora.compare.CompareOptions"
        )
    opt_kw = {k: v for k, v in kwargs.items() if k in option_names}
    set_kw = {k: v for k, v in kwargs.items() if k in setting_names}
    if options is None:
        options = Options(**{"output_dir": DEFAULT_OUTPUT_DIR, **opt_kw})
    elif opt_kw:
        options = dataclasses.replace(options, **opt_kw)
    if settings is None:
        settings = CompareOptions(**set_kw)
    elif set_kw:
        settings = dataclasses.replace(settings, **set_kw)
    return Comparison(options, settings, command=command).run()


# ------------------------------------------------------------------------------------------------ planning
@dataclasses.dataclass
class Job:
    """A planned job: what the worker gets (a typed record of :mod:`diffora.compare.jobs`), what it waits for and
    when it runs."""

    spec: Any  # SearchJob | FinetuneJob | TimingJob
    needs: Optional[str] = None  # id of the search this job exports from or reads DiffoRA's kept set from
    order: tuple = ()

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def key(self) -> dict:
        return self.spec.key

    def to_worker(self) -> Any:
        return self.spec


class Comparison:
    def __init__(self, options: Options, settings: CompareOptions, *, command: Optional[str] = None) -> None:
        self.overwrite_pending = False
        self.opts = options
        self.settings = settings
        self.command = command or "diffora.compare.compare(...)"
        self.out = Path(options.output_dir)
        self.started = time.perf_counter()

    # .............................................................................. validation, before any job
    def validate(self) -> None:
        """Every option, the data and the model, checked before the first job (one-line errors)."""
        from ..cli.loading import load_model
        from ..data.splits import split_for_search
        from ..method.candidates import detect_task_heads, find_candidates
        from .jobs import continue_steps, finetune_steps, search_config, search_steps

        opts, s = self.opts, self.settings
        self.methods: list[Method] = parse_methods(s.methods, opts)
        import torch

        if opts.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; use bf16 on CPU")
        self.main_split = "holdout" if s.eval_on_holdout else "main"
        self.resume_state = self._check_output_dir()
        data = load_split(opts, self.main_split, s.holdout_rows)
        model, tokenizer = load_model(opts, data)
        self._check_length(model, tokenizer)
        self.prep: Prepared = prepared(opts, self.main_split, s.holdout_rows, data=data, tokenizer=tokenizer)
        preps = [self.prep]
        self.holdout_rows = len(self.prep.eval_items) if s.eval_on_holdout else 0
        if s.tune_lr:
            self.tune_prep = prepared(opts, "holdout", s.holdout_rows, tokenizer=tokenizer)
            self.holdout_rows = len(self.tune_prep.eval_items)
            preps.append(self.tune_prep)
        self.grid = find_candidates(model, opts.target_types)
        heads = detect_task_heads(model)
        self.head_params = sum(p.numel() for h in heads for p in model.get_submodule(h).parameters())
        self.total_params = sum(p.numel() for p in model.parameters())
        self.ft_steps = finetune_steps(opts, len(self.prep.train_items))
        for method in self.methods:
            mopts = method.options(opts)
            where = f"method '{method.label}'"
            method.kind.validate(
                Validation(
                    where=where,
                    opts=mopts,
                    values=method.values,
                    grid=self.grid,
                    model=model,
                    train_rows=[len(p.train_items) for p in preps],
                )
            )
            if method.needs_search:
                for prep in preps:
                    w_idx, _ = split_for_search(len(prep.train_items), mopts.gate_fraction, 0)
                    steps = search_steps(mopts, len(w_idx))
                    hint = f"{where}: add data, raise --search-epochs/--search-steps or lower --gate-warmup-steps"
                    if mopts.handoff == "continue":  # as diffora run: the search is S < T of the fine-tune's steps
                        steps, total = continue_steps(mopts, len(prep.train_items), len(w_idx))
                        hint = (
                            f"{where}: with --handoff continue the search is at most {total - 1} of the "
                            f"{total} fine-tuning steps; add data, raise --epochs or lower --gate-warmup-steps"
                        )
                    check_warmup(steps, gate_warmup(steps, search_config(mopts)), error=DataError, hint=hint)
        del model

    def _check_length(self, model: Any, tokenizer: Any) -> None:
        limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        known = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
        if known and self.opts.max_length > min(known):
            raise ConfigError(
                f"--max-length {self.opts.max_length} is more than model '{self.opts.model}' can take "
                f"({min(known)} tokens); pass --max-length {min(known)} or less"
            )

    def _check_output_dir(self) -> Optional[dict]:
        """The finished jobs of an earlier run of this comparison, or None for a fresh start."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output-dir '{out}' is a file; choose a folder path")
        results = out / RESULTS_FILE
        if out.exists() and results.exists():
            try:
                saved = json.loads(results.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                saved = None
            if not isinstance(saved, dict) or saved.get("format") != RESULTS_FORMAT:
                raise ConfigError(f"'{results}' is not a diffora compare results file; choose another --output-dir")
            if self.opts.overwrite:
                self.overwrite_pending = True  # removed only once every check has passed
                return None
            now = self.fingerprint()
            before = with_new_defaults(saved.get("fingerprint", {}), now)
            changed = sorted(k for k in set(before) | set(now) if not _same_option(k, before.get(k), now.get(k)))
            if changed:
                k = changed[0]
                raise ConfigError(
                    f"'{out}' holds a comparison with other options ({', '.join(changed)}; {k} was {before.get(k)!r}, "
                    f"now {now.get(k)!r}); rerun with the same options to continue it, pass --overwrite to start "
                    "over, or choose another --output-dir"
                )
            return saved
        if out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"output directory '{out}' exists and holds no comparison (no {RESULTS_FILE}); choose "
                "another --output-dir"
            )
        probe = out.resolve().parent
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(
                f"cannot create '{out}' ('{probe}' is not a writable folder); choose another --output-dir"
            )
        return None

    def _remove_outputs(self) -> None:
        """--overwrite: remove an earlier comparison's files (only those: the folder may hold other things)."""
        for name in OUTPUT_NAMES:
            target = self.out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for png in self.out.glob("dam_*.png"):
            png.unlink()

    def fingerprint(self) -> dict:
        s = self.settings
        return {
            **{k: v for k, v in vars(self.opts).items() if k not in VOLATILE},
            "eval_points": s.eval_points,
            "holdout_rows": s.holdout_rows,
            "eval_on_holdout": s.eval_on_holdout,
        }

    # ......................................................................................... the job plan
    def lr_of(self, method: Method, tuned: Optional[dict] = None) -> tuple[float, str]:
        if method.explicit_lr is not None:
            return float(method.explicit_lr), "variant"
        if tuned and method.label in tuned:
            return float(tuned[method.label]), f"chosen on {self.holdout_rows} held-out training rows"
        return method.default_lr(self.opts, self.settings), "default"

    def worker_options(self, method_opts: Options, seed: int) -> dict:
        return {**vars(dataclasses.replace(method_opts, seed=seed, quiet=True)), "resume": False}

    def plan(self, split: str, seeds: list[int], lrs: Callable[[Method], list[float]], prefix: str = "") -> list[Job]:
        """Searches and fine-tunes of every method and seed on ``split``; ``lrs(method)`` gives the LRs to train."""
        from .jobs import FinetuneJob, SearchJob

        s = self.settings
        jobs: list[Job] = []
        searches: dict[str, Job] = {}
        for m_index, method in enumerate(self.methods):
            mopts = method.options(self.opts)
            method_lrs = lrs(method)
            if not method_lrs:
                continue
            for s_index, seed in enumerate(seeds):
                for lr in method_lrs:
                    needs = None
                    if method.needs_search:
                        values = method.search_values(self.opts)
                        label = search_label(values, self.opts)
                        sid = f"{prefix}search[{label}]"
                        if values["handoff"] == "continue":
                            # the search's weight steps are the first steps of the fine-tune at this LR
                            values["lr"] = lr
                            sid += f"@lr={lr:g}"
                        sid += f"@seed{seed}"
                        if sid not in searches:
                            (self.out / "searches").mkdir(parents=True, exist_ok=True)
                            search_opts = dataclasses.replace(self.opts, **values)
                            key = {
                                "kind": "search",
                                "split": split,
                                "seed": seed,
                                "search": json.loads(search_key(values)),
                            }
                            spec = SearchJob(
                                id=sid,
                                key=key,
                                split=split,
                                holdout_rows=s.holdout_rows,
                                options=self.worker_options(search_opts, seed),
                                state_path=str(self.out / "searches" / f"{_safe(sid)}.pt"),
                                label=label,
                            )
                            searches[sid] = Job(spec, order=(0, s_index, m_index))
                            jobs.append(searches[sid])
                        needs = sid
                    jid = f"{prefix}{method.label}" + (f"@lr={lr:g}" if prefix else "") + f"@seed{seed}"
                    key = {"kind": "finetune", "split": split, "seed": seed, "label": method.label, "lr": lr}
                    spec = FinetuneJob(
                        id=jid,
                        key=key,
                        split=split,
                        holdout_rows=s.holdout_rows,
                        options=self.worker_options(mopts, seed),
                        label=method.label,
                        family=method.family,
                        lr=lr,
                        eval_points=s.eval_points,
                        extra=method.extra,
                    )
                    jobs.append(Job(spec, needs=needs, order=(1, s_index, m_index)))
        return jobs

    # ....................................................................................... --tune-lr
    def tune_seeds(self) -> list[int]:
        """The seeds the LRs are chosen on: the first --tune-lr-seeds of --seeds, then the next unused integers."""
        seeds = list(self.settings.seeds[: self.settings.tune_lr_seeds])
        candidate = 0
        while len(seeds) < self.settings.tune_lr_seeds:
            if candidate not in self.settings.seeds and candidate not in seeds:
                seeds.append(candidate)
            candidate += 1
        return seeds

    def tune(self, runner: "Scheduler", results: dict) -> dict[str, float]:
        """Choose every method's LR on the held-out rows: train its grid on the tuning seeds, and while the best LR
        is the grid's largest or smallest, add one more LR beyond it (at most --tune-lr-extensions times)."""
        seeds, cap = self.tune_seeds(), self.settings.tune_lr_extensions
        grids = {m.label: self.candidate_lrs(m) for m in self.methods if m.explicit_lr is None}
        extensions = {label: 0 for label in grids}
        while True:
            runner.run(self.plan("holdout", seeds, lambda m: grids.get(m.label, []), "tune:"))
            chosen, table = self.tuned_lrs(results, grids, seeds, extensions)
            grown = False
            for label, grid in grids.items():
                more = extend_lr_grid(grid, table[label]["chosen"]) if table[label]["tried"] else None
                if more is not None and extensions[label] < cap:
                    grids[label] = sorted(grid + [more])
                    extensions[label] += 1
                    grown = True
            if not grown or runner.stopped:
                return chosen

    def tuned_lrs(
        self, results: dict, grids: dict[str, list[float]], seeds: list[int], extensions: dict[str, int]
    ) -> tuple[dict[str, float], dict[str, dict]]:
        """The LR of each tuned method: the best mean held-out score over the tuning seeds (ties: nearest the
        default LR), and the table ``results.json`` records."""
        from ..evaluation.metrics import higher_is_better

        metric = self.tune_prep.data.main_metric
        chosen, table = {}, {}
        for method in self.methods:
            if method.label not in grids:
                continue
            default = method.default_lr(self.opts, self.settings)
            per_seed: dict[float, dict[int, float]] = {}
            for lr in grids[method.label]:
                for seed in seeds:
                    rec = results["jobs"].get(f"tune:{method.label}@lr={lr:g}@seed{seed}")
                    if rec and "error" not in rec and "final" in rec:
                        value = rec["final"].get(metric)
                        if value is not None and not (isinstance(value, float) and math.isnan(value)):
                            per_seed.setdefault(lr, {})[seed] = value
            row: dict[str, Any] = {
                "grid": [float(lr) for lr in grids[method.label]],
                "seeds": seeds,
                "extensions": extensions[method.label],
            }
            if not per_seed:
                row.update(
                    tried={}, chosen=default, default=default, note="no tuning job finished: the default LR is used"
                )
                chosen[method.label] = default
                table[method.label] = row
                continue
            tried = {lr: sum(v.values()) / len(v) for lr, v in per_seed.items()}
            best = choose_lr(tried, default, higher_is_better(metric))
            chosen[method.label] = best
            row.update(
                tried={f"{lr:g}": v for lr, v in sorted(tried.items())},
                chosen=best,
                default=default,
                per_seed={f"{lr:g}": {str(k): x for k, x in v.items()} for lr, v in sorted(per_seed.items())},
                interior=extend_lr_grid(grids[method.label], best) is None,
            )
            table[method.label] = row
        results["lr_choice"] = {
            "metric": metric,
            "seed": seeds[0],
            "seeds": seeds,
            "holdout_rows": self.holdout_rows,
            "max_extensions": self.settings.tune_lr_extensions,
            "methods": table,
        }
        return chosen, table

    def candidate_lrs(self, method: Method) -> list[float]:
        default = method.default_lr(self.opts, self.settings)
        return sorted({float(f"{default * f:.6g}") for f in self.settings.tune_lr_factors})

    # .................................................................................................. run
    def run(self) -> dict:
        from .data import clear_cache
        from .jobs import TimingJob

        clear_cache()  # data files may have changed since an earlier comparison in this process
        self.validate()
        if self.overwrite_pending:
            self._remove_outputs()
        s = self.settings
        results = self._start_results()
        runner = Scheduler(self, results)
        try:
            if s.timing:
                timing = TimingJob(
                    id="timing",
                    key={"kind": "timing", "rounds": s.timing_rounds},
                    split=self.main_split,
                    holdout_rows=s.holdout_rows,
                    options=self.worker_options(self.opts, 0),
                    rounds=s.timing_rounds,
                )
                runner.run([Job(timing, order=(-1,))])
            tuned = self.tune(runner, results) if s.tune_lr else None
            lr_info = {m.label: self.lr_of(m, tuned) for m in self.methods}
            results["methods"] = [
                {
                    "label": m.label,
                    "family": m.family,
                    "overrides": dict(m.overrides),
                    "lr": lr_info[m.label][0],
                    "lr_source": lr_info[m.label][1],
                    "what": m.kind.what,
                }
                for m in self.methods
            ]
            main_jobs = self.plan(self.main_split, s.seeds, lambda m: [lr_info[m.label][0]])
            results["plan"] = [j.id for j in main_jobs]
            runner.run(main_jobs)
        finally:
            runner.close()
            self._finish(results)
        from .report import write_report

        write_report(results, self.out)
        if all("error" not in results["jobs"].get(j, {"error": 1}) for j in results["plan"]) and not results["skipped"]:
            shutil.rmtree(self.out / "searches", ignore_errors=True)  # kept only to resume; a complete run needs none
        return results

    def _start_results(self) -> dict:
        data, s = self.prep.data, self.settings
        from ..evaluation.metrics import majority_baseline
        from .jobs import all_modules

        baseline = {}
        if data.kind != "causal_lm" and data.train.labels is not None:
            baseline = majority_baseline(data.train.labels, data.eval.labels, data.metrics)
        from .jobs import eval_every

        saved = self.resume_state or {}
        now = _dt.datetime.now().isoformat(timespec="seconds")
        results = {
            "format": RESULTS_FORMAT,
            "command": self.command,
            "started": saved.get("started", now),
            "invocations": saved.get("invocations", [])
            + [{"command": self.command, "started": now, "commit": _versions().get("git_commit")}],
            "machine": _machine(self.workers(), self.threads()),
            "versions": _versions(),
            "options": vars(self.opts),
            "settings": dataclasses.asdict(s),
            "fingerprint": self.fingerprint(),
            "methods": saved.get("methods", []),
            "data": {
                "task": data.name,
                "kind": data.kind,
                "metrics": list(data.metrics),
                "main_metric": data.main_metric,
                "train_rows": len(self.prep.train_items),
                "eval_rows": len(self.prep.eval_items),
                "eval_set": "held-out split of train" if s.eval_on_holdout else "eval",
                "holdout_rows": self.holdout_rows or None,
                "majority_baseline": baseline,
                "finetune_steps": self.ft_steps,
                "eval_every": eval_every(self.opts, self.ft_steps, s.eval_points),
                "model": self.opts.model,
                "candidates": len(self.grid.module_names()),
                "grid": {"layers": len(self.grid.layers), "types": list(self.grid.labels)},
                "lora_all_lora_params": all_modules(self.grid, self.opts.rank).lora_params,
                "head_params": self.head_params,
                "model_params": self.total_params,
            },
            "jobs": {},
            "plan": [],
            "skipped": [],
            "timing": None,
            "lr_choice": saved.get("lr_choice"),
        }
        results["data"]["lora_all_params"] = results["data"]["lora_all_lora_params"] + self.head_params
        for jid, rec in (saved.get("jobs") or {}).items():
            if "error" not in rec:
                results["jobs"][jid] = rec
        self.save(results)
        return results

    def _finish(self, results: dict) -> None:
        wall = time.perf_counter() - self.started
        results["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        results["invocations"][-1]["wall_seconds"] = wall
        results["wall_seconds"] = sum(i.get("wall_seconds", 0.0) for i in results["invocations"])
        if "timing" in results["jobs"] and "error" not in results["jobs"]["timing"]:
            results["timing"] = results["jobs"]["timing"]
        self.save(results)

    def save(self, results: dict) -> None:
        atomic_write_json(self.out / RESULTS_FILE, results)

    def workers(self) -> int:
        import torch

        w = self.settings.workers
        if w >= 0:
            return w
        if torch.cuda.is_available():
            return torch.cuda.device_count()
        return min(2, os.cpu_count() or 1)

    def threads(self) -> int:
        """torch threads per worker: --threads, else the cores shared out (0 with --workers 0: torch's default)."""
        if self.opts.threads > 0:
            return self.opts.threads
        workers = self.workers()
        return max(1, (os.cpu_count() or 1) // workers) if workers > 0 else 0


def choose_lr(scores: dict[float, float], default: float, higher_is_better: bool = True) -> float:
    """The LR with the best (mean held-out) score; ties go to the LR nearest the default (in log scale)."""
    sign = 1.0 if higher_is_better else -1.0
    return max(scores, key=lambda lr: (sign * scores[lr], -abs(math.log(lr / default))))


def extend_lr_grid(grid: list[float], best: float) -> Optional[float]:
    """The LR to try next when ``best`` is the grid's largest or smallest (one grid step beyond it, the step being the
    ratio to its neighbour, or 2 for a one-LR grid), or None when ``best`` is interior."""
    lrs = sorted(grid)
    if len(lrs) == 1:
        return float(f"{best * 2:.6g}")
    if best >= lrs[-1]:
        return float(f"{best * lrs[-1] / lrs[-2]:.6g}")
    if best <= lrs[0]:
        return float(f"{best * lrs[0] / lrs[1]:.6g}")
    return None


#: options that name files or folders: the same one named another way (relative, absolute) is the same option
PATH_OPTIONS = ("data_dir", "train_file", "eval_file")


def _same_option(name: str, before: Any, now: Any) -> bool:
    if name in PATH_OPTIONS and isinstance(before, str) and isinstance(now, str):
        return os.path.realpath(before) == os.path.realpath(now)
    return before == now


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-=" else "_" for c in text)


# ----------------------------------------------------------------------------------------------- scheduler
class Scheduler:
    """Runs jobs (in worker processes, or here with --workers 0) in dependency and priority order; saves
    ``results.json`` after every job; keeps going when a job fails."""

    def __init__(self, comparison: Comparison, results: dict) -> None:
        self.c = comparison
        self.results = results
        self.workers = comparison.workers()
        self.threads = comparison.threads()
        self.pool: Optional[cf.ProcessPoolExecutor] = None
        self.deadline = (
            comparison.started + 60 * comparison.settings.max_minutes if comparison.settings.max_minutes else None
        )
        self.bar: Any = None
        self.stopped = False  # --max-minutes ran out: start nothing more
        if self.workers == 0 and self.threads > 0:
            import torch

            torch.set_num_threads(self.threads)

    @staticmethod
    def execute(job: Any) -> dict:
        """Run one job in this process (--workers 0)."""
        from . import jobs

        return jobs.execute(job)

    def _pool(self) -> cf.ProcessPoolExecutor:
        if self.pool is None:
            import torch

            from ..runtime import init_worker_process

            ctx = mp.get_context("spawn")
            devices = None
            if torch.cuda.is_available():  # one worker per GPU
                devices = ctx.Queue()
                for i in range(self.workers):
                    devices.put(i % torch.cuda.device_count())
            self.pool = cf.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=ctx,
                initializer=init_worker_process,
                initargs=(self.threads, devices),
            )
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def done(self, job: Job) -> bool:
        rec = self.results["jobs"].get(job.id)
        if not rec or "error" in rec or not isinstance(rec.get("key"), dict):
            return False
        saved = rec["key"]
        if isinstance(saved.get("search"), dict) and isinstance(job.key.get("search"), dict):
            saved = {**saved, "search": with_new_defaults(saved["search"], job.key["search"])}
        return saved == job.key

    def run(self, jobs: list[Job]) -> None:
        from tqdm.auto import tqdm

        by_id = {j.id: j for j in jobs}
        waiting = {j.id for j in jobs if not self.done(j)}
        # A finished search whose saved state is gone (a complete run removes them) reruns only if a job that still
        # has to run exports from it.
        for j in jobs:
            if j.kind == "search" and j.id not in waiting and not Path(j.spec.state_path).exists():
                if any(p.needs == j.id and p.id in waiting for p in jobs):
                    waiting.add(j.id)
        if not waiting:
            return
        self.bar = tqdm(
            total=len(jobs),
            initial=len(jobs) - len(waiting),
            desc="diffora compare",
            unit="job",
            dynamic_ncols=True,
            disable=self.c.opts.quiet,
        )
        running: dict[Any, Job] = {}

        def ready() -> list[Job]:
            busy = waiting | {j.id for j in running.values()}  # a search still to run or running blocks its jobs
            return sorted(
                (j for j in jobs if j.id in waiting and not (j.needs and j.needs in busy)), key=lambda j: j.order
            )

        def start(job: Job) -> None:
            waiting.discard(job.id)
            if job.needs:
                if not self.done(by_id[job.needs]):
                    reason = self.results["jobs"].get(job.needs, {}).get("error", "it did not run")
                    self._record(job, {"kind": job.kind, "error": f"its search {job.needs} failed ({reason})"})
                    return
                self._attach(job, self.results["jobs"][job.needs])
            if self.workers == 0:
                self._show([job])
                self._record(job, self.execute(job.to_worker()))
            else:
                from .jobs import execute

                running[self._pool().submit(execute, job.to_worker())] = job
                self._show(list(running.values()))

        try:
            while True:
                queue = ready()
                if queue and self.deadline is not None and time.perf_counter() > self.deadline:
                    skipped = sorted(waiting, key=lambda i: by_id[i].order)
                    self.results["skipped"] += [i for i in skipped if i not in self.results["skipped"]]
                    waiting.clear()
                    self.stopped = True
                    if not self.c.opts.quiet:
                        self.bar.write(
                            f"diffora compare: --max-minutes {self.c.settings.max_minutes:g} reached; "
                            f"{len(skipped)} job(s) left for a rerun of the same command"
                        )
                    self.c.save(self.results)
                    queue = []
                while queue and len(running) < max(1, self.workers):
                    start(queue.pop(0))
                    if self.workers == 0:
                        break
                    queue = ready()
                if self.workers == 0:
                    if not ready():
                        break
                    continue
                if not running:
                    break
                finished, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    job = running.pop(fut)
                    try:
                        rec = fut.result()
                    except BrokenProcessPool:
                        rec = {
                            "kind": job.kind,
                            "error": "the worker process died (out of memory?); rerun the same "
                            "command to retry this job",
                        }
                        self.pool = None
                    self._record(job, rec)
                self._show(list(running.values()))
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def _attach(self, job: Job, search: dict) -> None:
        """Give a fine-tune what it needs from its finished search (the method's family decides what)."""
        from .methods import FAMILIES

        FAMILIES[job.spec.family].attach(job.spec, search)

    def _record(self, job: Job, rec: dict) -> None:
        rec["id"], rec["key"] = job.id, job.key
        if job.kind == "search":
            rec["state_path"], rec["label"] = job.spec.state_path, job.spec.label
        self.results["jobs"][job.id] = rec
        self.c.save(self.results)
        if self.bar is not None:
            self.bar.update(1)
            if not self.c.opts.quiet:
                self.bar.write(describe(job, rec, self.results))

    def _show(self, running: list[Job]) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("running: " + ", ".join(j.id for j in running) if running else "")


def describe(job: Job, rec: dict, results: dict) -> str:
    if "error" in rec:
        return f"  {job.id}: FAILED: {rec['error']}"
    if job.kind == "search":
        return f"  {job.id}: {rec['steps']} steps, {rec['seconds']:.0f}s"
    if job.kind == "timing":
        r = rec["ratios"]["search_iteration_over_lora_step"]
        return f"  timing: a search iteration costs {r:.2f} PEFT LoRA steps"
    m = results["data"]["main_metric"]
    value = rec.get("final", {}).get(m)
    return (
        f"  {job.id}: {m} {value:.4f}, fine-tune {rec['finetune_seconds']:.0f}s"
        if isinstance(value, (int, float))
        else f"  {job.id}: done"
    )


# ------------------------------------------------------------------------------------------ machine, versions
def _machine(workers: int, threads: int) -> dict:
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or "unknown"
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "gpu": bool(gpus),
        "gpus": gpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "workers": workers,
        "threads_per_worker": threads,
        "load_average_at_start": load,
    }


def _versions() -> dict:
    import peft
    import torch
    import transformers

    from .. import __version__

    root = Path(__file__).resolve().parents[3]
    commit, dirty = None, None
    if (root / ".git").exists():
        try:
            commit = (
                subprocess.run(
                    ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=10,
                ).stdout.strip()
                or None
            )
            dirty = bool(
                subprocess.run(
                    ["git", "-C", str(root), "status", "--porcelain", "src"],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=10,
                ).stdout.strip()
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "diffora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
        "git_commit": commit,
        "src_dirty": dirty,
    }
