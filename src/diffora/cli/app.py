"""``diffora`` command line: ``run``, ``search``, ``train``, ``eval``, ``compare``.

Every option is a field of :class:`diffora.cli.options.Options` (its ``help`` metadata is the ``--help`` text), spelled
with dashes on the command line (``--keep-ratio``) and with dashes or underscores in a ``--config`` YAML/JSON file.
Command-line flags override the config file. Relative paths in a config file are relative to the file's folder, and
a config file may only write (``output-dir``, ``output-file``) below that folder (see docs/reliability.md). Errors in
the input print one line and exit with status 2 (1 for internal errors); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from ..store.checkpoint import Interrupted
from ..errors import ConfigError, DiffoRAError

GROUP_TITLES = {
    "data": "data", "model": "model", "search": "DAM search and discretisation", "train": "fine-tuning",
    "run": "run",
}
COMMAND_GROUPS = {
    "run": ("data", "model", "search", "train", "run"),
    "search": ("data", "model", "search", "train", "run"),
    "train": ("data", "model", "search", "train", "run"),
    "eval": ("data", "model", "run"),
    "compare": ("data", "model", "search", "train", "run"),
    "ntk": ("data", "model", "search", "train", "run"),
}
COMMAND_HELP = {
    "run": "the whole pipeline: DAM search -> discretise -> export -> fine-tune -> evaluate -> save",
    "search": "DAM search and discretisation only (writes dam.json, dam.png, search_adapter/)",
    "train": "fine-tune LoRA on the modules of a search record (--dam) or an explicit list (--modules)",
    "eval": "score a saved adapter on the evaluation data",
    "compare": "DiffoRA against LoRA, AdaLoRA, EVA and random module selection on your data: every method, every "
               "seed, one report (OUT/report.md, results.json, plots); rerun the same command to resume",
    "ntk": "NTK module selection without a search: the modules that maximise lambda_min of the LoRA kernel, and "
           "lambda_min against random sets (= diffora search --selection-score ntk --search-epochs 0 --search-steps 0)",
}
EVAL_ONLY_SKIP = {"overwrite", "output_dir", "train_file", "max_train_samples"}
#: run options that compare replaces: --seeds instead of --seed; it resumes by itself (rerun the same command)
COMPARE_SKIP = {"seed", "resume", "checkpoint_every"}
COMPARE_DEFAULTS = {"output_dir": "runs/compare"}
COMPARE_HELP = {
    "overwrite": "Start over: remove the results of an earlier comparison in OUTPUT_DIR (without it, rerunning the "
                 "same command continues it).",
    "threads": "torch CPU threads per worker process (0: the cores shared out among the workers).",
    "quiet": "No progress bars or per-job lines.",
    "lr": "Peak learning rate of the LoRA family (DiffoRA, LoRA, random, EVA); see --adalora-lr and --full-lr.",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(element type, is_list) of a dataclass field annotation like ``Optional[list[str]]``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {"Optional": Optional})  # annotations are postponed strings
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _add_options(parser: argparse.ArgumentParser, groups: Sequence[str], command: str) -> None:
    from .options import Options

    sections = {g: parser.add_argument_group(GROUP_TITLES[g]) for g in groups}
    for f in fields(Options):
        group = f.metadata.get("group")
        if command == "eval" and f.name == "eval_batch_size":
            group = "data"
        if group not in groups or (command == "eval" and f.name in EVAL_ONLY_SKIP):
            continue
        if command == "compare" and f.name in COMPARE_SKIP:
            continue
        kind, is_list = _base_type(f.type)
        default = f.default if f.default is not MISSING else None
        text = f.metadata.get("help", "")
        if command == "compare":
            default = COMPARE_DEFAULTS.get(f.name, default)
            text = COMPARE_HELP.get(f.name, text)
        kwargs = _flag_kwargs(f.name, kind, is_list, f.name.upper() if not is_list else "NAME")
        kwargs["help"] = f"{text} (default: {default})"
        sections[group].add_argument(_flag(f.name), **kwargs)


def _flag_kwargs(name: str, kind: Any, is_list: bool, metavar: str) -> dict[str, Any]:
    """argparse keywords of a dataclass field's flag: ``--x/--no-x`` for a bool, typed (``nargs='+'`` for a list)
    otherwise; unset flags stay out of the namespace, so config-file values are not overridden by defaults."""
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs.update(type=kind, metavar=metavar)
        if is_list:
            kwargs["nargs"] = "+"
    return kwargs


def _add_compare_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``diffora compare`` that ``diffora run`` does not have (:class:`diffora.compare.CompareOptions`)."""
    from ..compare.settings import CompareOptions

    section = parser.add_argument_group("comparison")
    for f in fields(CompareOptions):
        kind, is_list = _base_type(f.type)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        metavar = {"methods": "METHOD", "seeds": "SEED", "tune_lr_factors": "FACTOR"}.get(f.name, f.name.upper())
        kwargs = _flag_kwargs(f.name, kind, is_list, metavar)
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        kwargs["help"] = f.metadata.get("help", "") + ("" if f.name == "methods" else f" (default: {shown})")
        section.add_argument(_flag(f.name), **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; diffora prints one line (exit code 2, via main)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="diffora",
        description="DiffoRA: learn which modules get LoRA (a Differential Adaptation Matrix), fine-tune them, and "
        "export a plain PEFT LoRA adapter.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"diffora {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, groups in COMMAND_GROUPS.items():
        sub = commands.add_parser(command, help=COMMAND_HELP[command], description=COMMAND_HELP[command])
        sub.add_argument("--config", metavar="FILE", help="YAML or JSON file with options (keys as the flags' names; relative paths are relative to the file)")
        sub.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
        if command == "train":
            sub.add_argument("--dam", metavar="DAM_JSON", help="search record from 'diffora search' (uses its kept modules)")
            sub.add_argument("--modules", nargs="+", metavar="NAME", help="explicit full module names to adapt")
        if command == "eval":
            sub.add_argument("--adapter", metavar="DIR", help="adapter folder (OUT/adapter); required")
            sub.add_argument("--output-file", metavar="FILE", help="also write the metrics JSON here")
        if command == "compare":
            _add_compare_options(sub)
        _add_options(sub, groups, command)
    return parser


def load_config_file(path: str, overridden: typing.Collection[str] = (),
                     extra_kinds: Optional[dict[str, tuple[type, bool, bool]]] = None,
                     command: str = "run") -> dict[str, Any]:
    """Options from a YAML/JSON file; keys may use dashes or underscores. Values are converted to the options'
    types; relative paths are resolved against the file's folder, and write locations must stay below it
    (options in ``overridden``, given on the command line, are not checked). ``extra_kinds`` adds a command's own
    keys (``diffora compare``'s), ``command`` is the one named in the unknown-key message."""
    from .options import Options

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist; check the --config path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc.__class__.__name__}") from None
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise many types
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: {exc.problem}" if mark is not None and getattr(exc, "problem", None) else (
            str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
        raise ConfigError(f"config file '{path}' is not valid {file.suffix.lstrip('.').upper() or 'YAML'} "
                          f"({where}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of option names to values")
    known = {f.name for f in fields(Options)} | set(EXTRA_KINDS) | set(extra_kinds or {})
    options = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file '{path}': unknown option '{key}'; see 'diffora {command} --help'")
        options[name] = _coerce(path, key, name, value, extra_kinds)
    base = file.resolve().parent
    for name, value in options.items():
        if isinstance(value, str) and name not in overridden:
            options[name] = _config_path(path, base, name, value)
    return options


#: config-file options that are not fields of Options (command-specific flags)
EXTRA_KINDS: dict[str, tuple[type, bool, bool]] = {
    "dam": (str, False, True), "modules": (str, True, True), "adapter": (str, False, True),
    "output_file": (str, False, True),
}
#: options naming files or folders that diffora reads / writes
INPUT_PATHS = ("train_file", "eval_file", "data_dir", "dam", "adapter")
OUTPUT_PATHS = ("output_dir", "output_file")
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(path: str, key: Any, name: str, value: Any,
            extra_kinds: Optional[dict[str, tuple[type, bool, bool]]] = None) -> Any:
    """A config value in the option's type, converted the way argparse converts a flag's text (YAML reads
    ``1e-3`` as a string, JSON may quote numbers); anything else is a one-line :class:`ConfigError`."""
    from .options import option_kinds

    kind, is_list, optional = {**option_kinds(), **EXTRA_KINDS, **(extra_kinds or {})}[name]

    def bad() -> ConfigError:
        what = "a list of strings" if is_list else _KIND_WORDS.get(kind, kind.__name__)
        return ConfigError(f"config file '{path}': option '{key}' must be {what}, got {value!r}")

    def one(item: Any) -> Any:
        if isinstance(item, bool) or item is None or isinstance(item, (list, dict)):
            if kind is bool and isinstance(item, bool):
                return item
            raise bad()
        if kind is bool:
            raise bad()
        if kind is str:
            return str(item) if isinstance(item, (str, int, float)) else _raise(bad())
        if kind is int and isinstance(item, float):
            return int(item) if item.is_integer() else _raise(bad())
        try:
            return kind(item)
        except (TypeError, ValueError, OverflowError):
            raise bad() from None

    if value is None:
        if optional:
            return None
        raise bad()
    if is_list:
        return [one(v) for v in value] if isinstance(value, list) else [one(value)]
    return one(value)


def _raise(exc: Exception) -> typing.NoReturn:
    raise exc


def _config_path(path: str, base: Path, name: str, value: str) -> str:
    """Paths in a config file are relative to the config file's folder. A config file may name where to *write*
    (``output-dir``, ``output-file``) only below that folder: it is data that may come from someone else, and with
    ``overwrite`` it could otherwise replace any folder the user can write. Command-line flags are not restricted."""
    if name in INPUT_PATHS:
        expanded = os.path.expanduser(value)
        return expanded if os.path.isabs(expanded) else str(base / expanded)
    if name == "model":  # a local folder next to the config, else a hub id or short name as given
        return str(base / value) if not os.path.isabs(value) and (base / value).exists() else value
    if name in OUTPUT_PATHS:
        target = (base / value).resolve()
        if value.startswith("~") or os.path.isabs(value) or target == base or base not in target.parents:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"config file '{path}' sets {name.replace('_', '-')} to '{value}', which is not below the config "
                f"file's folder; a config file may only write below its own folder: use a relative path there, or "
                f"pass {flag} on the command line"
            )
        return str(base / value)
    return value


def parse(argv: Optional[Sequence[str]] = None) -> tuple[str, Any, argparse.Namespace]:
    """Parse ``argv`` into (command, Options, raw namespace)."""
    from .options import Options

    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {k: v for k, v in vars(args).items()
                if k not in {"command", "config", "debug"} and not (k in EXTRA_KINDS and v is None)}
    compare_kinds = None
    if args.command == "compare":
        from ..compare.settings import compare_option_kinds

        compare_kinds = compare_option_kinds()
    values = load_config_file(args.config, overridden=set(explicit), extra_kinds=compare_kinds,
                              command=args.command) if args.config else {}
    values.update(explicit)
    if args.command == "compare":
        args.compare_settings = {k: values.pop(k) for k in list(values) if k in compare_kinds}
        values.setdefault("output_dir", COMPARE_DEFAULTS["output_dir"])
    extras = {k: values.pop(k) for k in ("dam", "modules", "adapter", "output_file") if k in values}
    for k, v in extras.items():
        setattr(args, k, v)
    args.model_given = "model" in values
    if args.command == "eval" and not getattr(args, "adapter", None):
        raise ConfigError("diffora eval needs --adapter DIR, the adapter folder a run wrote (OUT/adapter)")
    if args.command == "eval":
        values.setdefault("output_dir", ".")
    if args.command == "ntk":  # the kernel of fresh LoRA on every candidate, unless a search length is given
        values.setdefault("selection_score", "ntk")
        if "search_epochs" not in values and "search_steps" not in values:
            values.update(search_epochs=0.0, search_steps=0)
    try:
        opts = Options(**values)
    except TypeError as exc:  # a config value of the wrong type
        raise ConfigError(f"invalid option value: {exc}") from None
    return args.command, opts, args


def main(argv: Optional[Sequence[str]] = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    _quiet_libraries(debug)
    opts = None
    try:
        command, opts, args = parse(argv)
        from . import commands

        if command == "run":
            commands.run_job(opts)
        elif command in ("search", "ntk"):
            commands.search_job(opts)
        elif command == "train":
            commands.train_job(opts, dam=getattr(args, "dam", None), modules=getattr(args, "modules", None))
        elif command == "compare":
            _compare(opts, args, sys.argv[1:] if argv is None else list(argv))
        else:
            commands.eval_job(opts, args.adapter, getattr(args, "output_file", None), model_given=args.model_given)
    except Interrupted as exc:
        print(f"diffora: {exc}", file=sys.stderr)
        return 130
    except DiffoRAError as exc:
        if debug:
            raise
        print(f"diffora: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 1 for ResourceError (out of memory): the input was fine
    except OSError as exc:  # the disk filled up, or a folder cannot be written: the user's to fix, not a bug
        message = _os_error_message(exc, opts)
        if debug or message is None:
            if debug:
                raise
            return _internal_error(exc)
        print(f"diffora: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        checkpoints = Path(opts.output_dir) / "checkpoints" if opts is not None else None
        if checkpoints is not None and any(checkpoints.glob("*.pt")):
            print(f"diffora: interrupted; the checkpoints in {checkpoints} were kept: rerun the same command with "
                  "--resume to continue", file=sys.stderr)
        else:
            print("diffora: interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: say so, and how to get details
        if debug:
            raise
        return _internal_error(exc)
    return 0


def _compare(opts: Any, args: argparse.Namespace, argv: list[str]) -> None:
    import shlex

    from ..compare import CompareOptions, compare

    settings = CompareOptions(**args.compare_settings)
    out = Path(opts.output_dir)
    try:
        results = compare(opts, settings, command="diffora " + " ".join(shlex.quote(a) for a in argv))
    except KeyboardInterrupt:
        done = 0
        try:
            saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
            done = sum(1 for r in saved.get("jobs", {}).values() if "error" not in r)
        except (OSError, ValueError):
            pass
        raise Interrupted(f"interrupted; {done} finished job(s) are saved in {out / 'results.json'}: rerun the same "
                          "command to continue") from None
    if not opts.quiet:
        jobs = [results["jobs"].get(j, {}) for j in results["plan"]]
        failed = sum(1 for r in jobs if "error" in r)
        print(f"\ndiffora compare: {len(jobs) - failed - len(results['skipped'])} of {len(jobs)} jobs finished"
              + (f", {failed} failed" if failed else "") + (f", {len(results['skipped'])} left for a rerun"
                                                             if results["skipped"] else "")
              + f"; report: {out / 'report.md'} (results.json, curves.png, score_vs_params.png, dam_*.png)")


def _internal_error(exc: BaseException) -> int:
    print(f"diffora: internal error: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
          "(rerun with --debug for the traceback; please report it)", file=sys.stderr)
    return 1


_OS_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def _os_error_message(exc: OSError, opts: Any) -> Optional[str]:
    """One line for the file-system errors a user can fix (full disk, no permission); ``None`` for the others."""
    what = _OS_ERRORS.get(exc.errno)
    if what is None:
        return None
    where = f" while writing '{exc.filename}'" if exc.filename else ""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = "free some disk space" if full else "make the folder writable or choose another --output-dir"
    checkpoints = Path(opts.output_dir) / "checkpoints" if opts is not None else None
    if checkpoints is not None and any(checkpoints.glob("*.pt")):
        then = f"then rerun the same command with --resume to continue from {checkpoints}"
    else:
        then = "then rerun; no output was written and an existing output directory was left as it was"
    return f"{what}{where}; {fix}, {then}"


def _quiet_libraries(debug: bool) -> None:
    if debug:
        return
    import warnings

    from ..runtime import quiet_library_loggers

    quiet_library_loggers()  # before anything imports those libraries
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
