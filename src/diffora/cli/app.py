"""``diffora`` command line: ``run``, ``search``, ``train``, ``eval``, ``ntk``, ``compare``.

Every option is a field of :class:`diffora.cli.options.Options` (its ``help`` metadata is the ``--help`` text), spelled
with dashes on the command line (``--keep-ratio``) and with dashes or underscores in a ``--config`` YAML/JSON file;
each command takes the options its code reads (:data:`~diffora.cli.options.COMMAND_OPTIONS`). Command-line flags
override the config file. Relative paths in a config file are relative to the file's folder, and a config file may
only write (``output-dir``, ``output-file``) below that folder (see docs/reliability.md). Errors in the input print
one line and exit with status 2 (1 for internal errors); ``--debug`` shows the traceback.

Nothing here imports torch, transformers or peft before a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError, DiffoRAError

GROUP_TITLES = {
    "data": "data",
    "model": "model",
    "search": "DAM search and discretisation",
    "train": "fine-tuning",
    "run": "run",
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
COMPARE_DEFAULTS = {"output_dir": "runs/compare"}
COMPARE_HELP = {
    "overwrite": "Start over: remove the results of an earlier comparison in OUTPUT_DIR (without it, rerunning the "
    "same command continues it).",
    "threads": "torch CPU threads per worker process (0: the cores shared out among the workers).",
    "quiet": "No progress bars or per-job lines.",
    "lr": "Peak learning rate of the LoRA family (DiffoRA, LoRA, random, EVA); see --adalora-lr and --full-lr.",
}
#: options naming files or folders that diffora reads / writes
INPUT_PATHS = ("train_file", "eval_file", "data_dir", "dam", "adapter")
OUTPUT_PATHS = ("output_dir", "output_file")
_OWN_FLAGS = ("command", "config", "debug")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %


def _add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of ``command``: the :class:`Options` fields it takes, grouped as in ``diffora run --help``."""
    from .options import COMMAND_OPTIONS, Options, option_kinds

    taken = COMMAND_OPTIONS[command]
    kinds = option_kinds()
    chosen = [f for f in fields(Options) if f.name in taken]
    group_of = {
        f.name: "data" if command == "eval" and f.name == "eval_batch_size" else f.metadata["group"] for f in chosen
    }
    sections = {g: parser.add_argument_group(t) for g, t in GROUP_TITLES.items() if g in group_of.values()}
    for f in chosen:
        group = group_of[f.name]
        default = _default(f)
        text = f.metadata.get("help", "")
        if command == "compare":
            default = COMPARE_DEFAULTS.get(f.name, default)
            text = COMPARE_HELP.get(f.name, text)
        kind = kinds[f.name]
        kwargs = _flag_kwargs(f.name, kind.type, kind.is_list, "NAME" if kind.is_list else f.name.upper())
        kwargs["help"] = _help(f"{text} (default: {default})")
        sections[group].add_argument(_flag(f.name), **kwargs)


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


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


def _add_inputs(parser: argparse.ArgumentParser, cls: type) -> None:
    """A command's own inputs (``train --dam``, ``eval --adapter``), from their dataclass."""
    from ..method.config import field_kinds

    kinds = field_kinds(cls)
    for f in fields(cls):
        kind = kinds[f.name]
        kwargs = _flag_kwargs(f.name, kind.type, kind.is_list, f.metadata.get("metavar", f.name.upper()))
        parser.add_argument(_flag(f.name), **kwargs, help=_help(f.metadata.get("help", "")))


def _add_compare_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``diffora compare`` that ``diffora run`` lacks (:class:`diffora.compare.CompareOptions`)."""
    from ..compare.settings import CompareOptions, compare_option_kinds

    section = parser.add_argument_group("comparison")
    kinds = compare_option_kinds()
    for f in fields(CompareOptions):
        kind = kinds[f.name]
        metavar = {"methods": "METHOD", "seeds": "SEED", "tune_lr_factors": "FACTOR"}.get(f.name, f.name.upper())
        kwargs = _flag_kwargs(f.name, kind.type, kind.is_list, metavar)
        default = _default(f)
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        kwargs["help"] = _help(f.metadata.get("help", "") + ("" if f.name == "methods" else f" (default: {shown})"))
        section.add_argument(_flag(f.name), **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; diffora prints one line (exit code 2, via main)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message}; see '{self.prog} --help'")


def build_parser(only: Optional[typing.Collection[str]] = None) -> argparse.ArgumentParser:
    """The ``diffora`` parser. With ``only``, just those subcommands get their options (the others are listed by
    name): parsing one command reads no other command's options, and ``diffora --help`` reads none."""
    parser = _Parser(
        prog="diffora",
        description="DiffoRA: learn which modules get LoRA (a Differential Adaptation Matrix), fine-tune them, and "
        "export a plain PEFT LoRA adapter.",
    )
    from .. import __version__
    from .options import COMMAND_INPUTS

    parser.add_argument("--version", action="version", version=f"diffora {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in COMMAND_HELP.items():
        sub = commands.add_parser(name, help=text, description=text)
        if only is not None and name not in only:
            continue
        sub.add_argument(
            "--config",
            metavar="FILE",
            help="YAML or JSON file with options (keys as the flags' names; relative paths are relative to the file)",
        )
        sub.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
        if name in COMMAND_INPUTS:
            _add_inputs(sub, COMMAND_INPUTS[name])
        if name == "compare":
            _add_compare_options(sub)
        _add_options(sub, name)
    return parser


def command_kinds(command: str) -> dict[str, Any]:
    """name -> Kind of every option ``command`` takes: its :class:`Options` fields, its own inputs, and for compare
    the :class:`~diffora.compare.CompareOptions`."""
    from ..method.config import field_kinds
    from .options import COMMAND_INPUTS, COMMAND_OPTIONS, option_kinds

    kinds = {k: v for k, v in option_kinds().items() if k in COMMAND_OPTIONS[command]}
    if command in COMMAND_INPUTS:
        kinds.update(field_kinds(COMMAND_INPUTS[command]))
    if command == "compare":
        from ..compare.settings import compare_option_kinds

        kinds.update(compare_option_kinds())
    return kinds


def _not_taken(command: str, name: str) -> Optional[str]:
    """The message for an option that exists but that ``command`` does not take; ``None`` for an unknown name."""
    from .options import COMMAND_INPUTS, COMMAND_OPTIONS

    takers = [
        c
        for c in COMMAND_HELP
        if name in COMMAND_OPTIONS[c] or (c in COMMAND_INPUTS and name in {f.name for f in fields(COMMAND_INPUTS[c])})
    ]
    if not takers:
        return None
    return (
        f"'diffora {command}' does not take {_flag(name)} (an option of diffora {', '.join(takers)}); see "
        f"'diffora {command} --help'"
    )


def load_config_file(path: str, overridden: typing.Collection[str] = (), command: str = "run") -> dict[str, Any]:
    """Options from a YAML/JSON file; keys may use dashes or underscores, and must be options of ``command``.
    Values are converted to the options' types; relative paths are resolved against the file's folder, and write
    locations must stay below it (options in ``overridden``, given on the command line, are not checked)."""
    from ..method.config import convert_value

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
        where = (
            f"line {mark.line + 1}: {exc.problem}"
            if mark is not None and getattr(exc, "problem", None)
            else (str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
        )
        raise ConfigError(
            f"config file '{path}' is not valid {file.suffix.lstrip('.').upper() or 'YAML'} ({where}); fix the syntax"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of option names to values")
    kinds = command_kinds(command)
    options = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in kinds:
            # the same rule as on the command line: an option of another command is named as such
            other = _not_taken(command, name)
            raise ConfigError(
                f"config file '{path}': " + (other or f"unknown option '{key}'; see 'diffora {command} --help'")
            )
        try:
            options[name] = convert_value(value, kinds[name])
        except ValueError:
            raise ConfigError(
                f"config file '{path}': option '{key}' must be {kinds[name].describe()}, got {value!r}"
            ) from None
    base = file.resolve().parent
    for name, value in options.items():
        if isinstance(value, str) and name not in overridden:
            options[name] = _config_path(path, base, name, value)
    return options


def _config_path(path: str, base: Path, name: str, value: str) -> str:
    """Paths in a config file are relative to the config file's folder. A config file may name where to *write*
    (``output-dir``, ``output-file``) only below that folder: it is data that may come from someone else, and with
    ``overwrite`` it could otherwise replace any folder the user can write. Command-line flags are not restricted."""
    if name in INPUT_PATHS:
        expanded = os.path.expanduser(value)
        if os.path.isabs(expanded):
            return expanded
        if name in ("train_file", "eval_file") and not (base / expanded).exists():
            from ..data.readers import is_hub_dataset_id  # torch-free

            if is_hub_dataset_id(value):  # a hub dataset id stays as written, like a hub model id
                return value
        return str(base / expanded)
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


def _command_in(argv: Sequence[str]) -> Optional[str]:
    """The subcommand ``argv`` names (its first word that is not a flag), if it is one."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMAND_HELP else None


def _unrecognized(command: str, extras: list[str]) -> ConfigError:
    flag = next((a for a in extras if a.startswith("--")), None)
    other = _not_taken(command, flag[2:].split("=")[0].replace("-", "_")) if flag else None
    return ConfigError(other or f"unrecognized arguments: {' '.join(extras)}; see 'diffora {command} --help'")


def parse(argv: Optional[Sequence[str]] = None) -> tuple[str, Any, argparse.Namespace]:
    """Parse ``argv`` into (command, Options, raw namespace)."""
    from .options import COMMAND_INPUTS, Options

    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    parser = build_parser([command] if command else [])
    args, extras = parser.parse_known_args(argv)
    if extras:
        raise _unrecognized(args.command, extras)
    explicit = {k: v for k, v in vars(args).items() if k not in _OWN_FLAGS}
    values = load_config_file(args.config, overridden=set(explicit), command=args.command) if args.config else {}
    values.update(explicit)
    if args.command == "compare":
        from ..compare.settings import compare_option_kinds

        args.compare_settings = {k: values.pop(k) for k in list(values) if k in compare_option_kinds()}
        values.setdefault("output_dir", COMPARE_DEFAULTS["output_dir"])
    inputs = {f.name for f in fields(COMMAND_INPUTS[args.command])} if args.command in COMMAND_INPUTS else set()
    for name in inputs:
        setattr(args, name, values.pop(name, None))
    args.model_given = "model" in values
    if args.command == "eval" and not args.adapter:
        raise ConfigError("diffora eval needs --adapter DIR, the adapter folder a run wrote (OUT/adapter)")
    if args.command == "eval":
        values.setdefault("output_dir", ".")
    if args.command == "ntk":  # the kernel of fresh LoRA on every candidate, unless a search length is given
        values.setdefault("selection_score", "ntk")
        if "search_epochs" not in values and "search_steps" not in values:
            values.update(search_epochs=0.0, search_steps=0)
    return args.command, Options(**values), args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    opts = None
    try:
        command, opts, args = parse(argv)
        # before the command imports those libraries, after --help (which needs none)
        _quiet_libraries(debug)
        from . import commands

        if command == "run":
            commands.run_job(opts)
        elif command in ("search", "ntk"):
            commands.search_job(opts)
        elif command == "train":
            commands.train_job(opts, dam=getattr(args, "dam", None), modules=getattr(args, "modules", None))
        elif command == "compare":
            _compare(opts, args, argv)
        else:
            commands.eval_job(opts, args.adapter, getattr(args, "output_file", None), model_given=args.model_given)
    except DiffoRAError as exc:
        if _interrupted(exc):
            print(f"diffora: {exc}", file=sys.stderr)
            return 130
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
            print(
                f"diffora: interrupted; the checkpoints in {checkpoints} were kept: rerun the same command with "
                "--resume to continue",
                file=sys.stderr,
            )
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
    from ..store.checkpoint import Interrupted

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
        raise Interrupted(
            f"interrupted; {done} finished job(s) are saved in {out / 'results.json'}: rerun the same "
            "command to continue"
        ) from None
    if not opts.quiet:
        jobs = [results["jobs"].get(j, {}) for j in results["plan"]]
        failed = sum(1 for r in jobs if "error" in r)
        print(
            f"\ndiffora compare: {len(jobs) - failed - len(results['skipped'])} of {len(jobs)} jobs finished"
            + (f", {failed} failed" if failed else "")
            + (f", {len(results['skipped'])} left for a rerun" if results["skipped"] else "")
            + f"; report: {out / 'report.md'} (results.json, curves.png, score_vs_params.png, dam_*.png)"
        )


def _interrupted(exc: BaseException) -> bool:
    """Whether a run stopped on a signal after a checkpoint. Only a run that loaded the checkpoint module (and torch)
    can raise that, so it is looked up, not imported: an option error must not pay for importing torch."""
    checkpoint = sys.modules.get("diffora.store.checkpoint")
    return checkpoint is not None and isinstance(exc, checkpoint.Interrupted)


def _internal_error(exc: BaseException) -> int:
    print(
        f"diffora: internal error: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
        "(rerun with --debug for the traceback; please report it)",
        file=sys.stderr,
    )
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
