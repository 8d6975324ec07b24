"""Options declared once (issue #19), one type checker, per-command option sets, and a ``--help`` that imports no
heavy library (issue #21 item 5)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from dataclasses import fields

import pytest

from diffora.cli import options as cli_options
from diffora.cli.app import COMMAND_HELP, main, parse
from diffora.cli.options import COMMAND_OPTIONS, Options
from diffora.compare.settings import CompareOptions
from diffora.errors import ConfigError
from diffora.method.config import DiffoRAConfig, FinetuneOptions, flag_names, flag_of
from diffora.train import FinetuneOptions as TrainFinetuneOptions


def _help(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def _flags(*argv: str, capsys) -> set[str]:
    """The flags ``--help`` lists (not the ones its texts mention)."""
    return set(re.findall(r"^ {2}(--[a-z0-9-]+)", _help(*argv, capsys=capsys), flags=re.M))


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffora: error: "), err
    return err


# ----------------------------------------------------------------------------------------- declared once
def test_every_library_field_is_a_flag_of_run(capsys) -> None:
    """New DiffoRAConfig / FinetuneOptions fields become flags without touching the CLI; the CLI's spelling of a
    library field is its metadata, not a second field."""
    text = _help("run", capsys=capsys)
    names = {f.name for f in fields(Options)}
    for cls in (DiffoRAConfig, FinetuneOptions):
        for f in fields(cls):
            flag = flag_of(cls, f.name)
            assert flag in names, f"{cls.__name__}.{f.name} has no Options field"
            assert "--" + flag.replace("_", "-") in text, f"{cls.__name__}.{f.name} has no flag in 'diffora run --help'"
    assert flag_of(DiffoRAConfig, "dropout") == "lora_dropout" and flag_of(DiffoRAConfig, "weight_lr") == "search_lr"
    assert "dropout" not in names and "weight_lr" not in names  # no mirrored field beside the flag's
    assert TrainFinetuneOptions is FinetuneOptions


def test_help_text_is_the_library_field_help(capsys) -> None:
    text = " ".join(_help("run", capsys=capsys).split())
    help_of = {f.name: f.metadata["help"] for f in fields(DiffoRAConfig)}
    for name in ("keep_ratio", "gate_lr", "dropout"):
        assert " ".join(help_of[name].split())[:40] in text, name


def test_options_build_the_library_configs_from_every_field() -> None:
    opts = Options(
        lora_dropout=0.1, search_lr=1e-3, gate_init=0.5, search_weight_decay=0.01, lr=2e-3, weight_decay=0.02
    )
    config = opts.search_config()
    assert (config.dropout, config.weight_lr, config.gate_init, config.weight_decay) == (0.1, 1e-3, 0.5, 0.01)
    assert opts.finetune_options() == FinetuneOptions(lr=2e-3, weight_decay=0.02)
    default = Options()
    assert default.search_config() == DiffoRAConfig()  # the CLI's defaults are the library's
    assert default.finetune_options() == FinetuneOptions()
    assert dataclasses.replace(default, rank=4).search_config().rank == 4


def test_a_flag_declared_twice_is_refused(monkeypatch) -> None:
    @dataclasses.dataclass
    class Clash:
        search_lr: float = 1.0

    monkeypatch.setattr(cli_options, "SOURCES", (*cli_options.SOURCES, (Clash, "search")))
    with pytest.raises(TypeError, match="option 'search_lr' is declared by both DiffoRAConfig and Clash"):
        cli_options._compose()


# ------------------------------------------------------------------------------------------ one type checker
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: DiffoRAConfig(alpha="x"), "alpha must be a number, got 'x'"),
        (lambda: DiffoRAConfig(rank=2.0), "rank must be an integer, got 2.0"),
        (lambda: DiffoRAConfig(gate_lr=math.inf), "gate_lr must be a finite number, got inf"),
        (lambda: DiffoRAConfig(target_types=[1]), "target_types must be a list of strings, got 1"),
        (lambda: FinetuneOptions(lr="x"), "lr must be a number, got 'x'"),
        (lambda: FinetuneOptions(epochs=math.nan), "epochs must be a finite number, got nan"),
        (lambda: FinetuneOptions(keep_best=1), "keep_best must be true or false, got 1"),
        (lambda: Options(alpha="x"), "--alpha must be a number, got 'x'"),
        (lambda: Options(lora_dropout="x"), "--lora-dropout must be a number, got 'x'"),
        (lambda: Options(epochs=math.inf), "--epochs must be a finite number, got inf"),
        (lambda: CompareOptions(seeds=["a"]), "--seeds must be a list of integers, got 'a'"),
        (lambda: CompareOptions(adalora_lr=math.inf), "--adalora-lr must be a finite number, got inf"),
    ],
)
def test_one_type_checker_one_message_form(build, message) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value) == message


def test_errors_name_the_flag_the_user_typed() -> None:
    """The library names its fields; the CLI (and Options) the flags: no rewriting of messages."""
    with pytest.raises(ConfigError, match=r"^dropout must be in \[0, 1\)"):
        DiffoRAConfig(dropout=1.5)
    with pytest.raises(ConfigError, match=r"^--lora-dropout must be in \[0, 1\)"):
        Options(lora_dropout=1.5)
    with pytest.raises(ConfigError, match=r"^--search-lr must be > 0"):
        Options(search_lr=0.0)
    with pytest.raises(ConfigError, match=r"^--search-weight-decay must be >= 0"):
        Options(search_weight_decay=-1.0)
    with pytest.raises(ConfigError, match=r"^--weight-decay must be >= 0"):
        Options(weight_decay=-1.0)
    with flag_names():
        with pytest.raises(ConfigError, match=r"^--lr must be > 0"):
            FinetuneOptions(lr=0.0)
    with pytest.raises(ConfigError, match=r"^lr must be > 0"):  # the naming does not leak out of the block
        FinetuneOptions(lr=0.0)


def test_config_file_values_go_through_the_same_checker(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("alpha: '8'\nrank: 4.0\ntarget-types: query\nmax-grad-norm: null\n")
    _, opts, _ = parse(["run", "--config", str(config)])
    assert (opts.alpha, opts.rank, opts.target_types, opts.max_grad_norm) == (8.0, 4, ["query"], None)
    config.write_text("epochs: .inf\n")
    with pytest.raises(ConfigError, match="^--epochs must be a finite number"):
        parse(["run", "--config", str(config)])
    config.write_text("seeds: [1, x]\n")
    with pytest.raises(ConfigError, match="option 'seeds' must be a list of integers, got \\[1, 'x'\\]"):
        parse(["compare", "--config", str(config)])


# ---------------------------------------------------------------------------------------- per-command options
@pytest.mark.parametrize(
    "argv, flag, takers",
    [
        (["train", "--gate-lr", "0.2"], "--gate-lr", "run, search, compare, ntk"),
        (["train", "--keep-ratio", "0.1"], "--keep-ratio", "run, search, compare, ntk"),
        (["search", "--epochs", "5"], "--epochs", "run, train, compare"),
        (["eval", "--adapter", "a", "--resume"], "--resume", "run"),
        (["eval", "--adapter", "a", "--lr", "1e-3"], "--lr", "run, train, compare"),
        (["run", "--dam", "dam.json"], "--dam", "train"),
        (["compare", "--checkpoint-every", "1"], "--checkpoint-every", "run"),  # compare resumes by itself
    ],
)
def test_a_command_refuses_the_options_it_does_not_use(argv, flag, takers, capsys) -> None:
    err = _error(argv, capsys)
    assert f"'diffora {argv[0]}' does not take {flag} (an option of diffora {takers})" in err, err
    assert f"see 'diffora {argv[0]} --help'" in err


def test_the_same_rule_for_config_files(tmp_path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("rank: 4\ngate-lr: 0.2\n")
    err = _error(["train", "--modules", "x", "--config", str(config)], capsys)
    assert "config file" in err and "'diffora train' does not take --gate-lr" in err
    config.write_text("rank: 4\nlearning_rate: 0.2\n")
    err = _error(["train", "--modules", "x", "--config", str(config)], capsys)
    assert "unknown option 'learning_rate'; see 'diffora train --help'" in err


def test_help_lists_only_the_command_options(capsys) -> None:
    train = _flags("train", capsys=capsys)
    assert {"--epochs", "--rank", "--lora-dropout", "--dam", "--modules", "--seed"} <= train
    assert not train & {"--gate-lr", "--keep-ratio", "--search-epochs", "--resume", "--selection-score"}
    search = _flags("search", capsys=capsys)
    assert {"--keep-ratio", "--gate-lr", "--search-lr", "--gradient-accumulation-steps"} <= search
    assert not search & {"--epochs", "--lr", "--warmup-ratio", "--resume", "--checkpoint-every", "--dam"}
    evaluation = _flags("eval", capsys=capsys)
    assert {"--adapter", "--output-file", "--eval-file", "--model", "--eval-batch-size"} <= evaluation
    assert not evaluation & {"--resume", "--rank", "--epochs", "--train-file", "--output-dir", "--overwrite"}
    assert _flags("run", capsys=capsys) == {"--config", "--debug"} | {
        "--" + n.replace("_", "-") for n in COMMAND_OPTIONS["run"]
    }


def test_every_command_has_an_option_set() -> None:
    assert set(COMMAND_OPTIONS) == set(COMMAND_HELP)
    assert COMMAND_OPTIONS["run"] == {f.name for f in fields(Options)}
    for command, names in COMMAND_OPTIONS.items():
        assert names <= COMMAND_OPTIONS["run"], command


# ---------------------------------------------------------------------------------------------- fast --help
@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], *([c, "--help"] for c in COMMAND_HELP)], ids=lambda a: " ".join(a)
)
def test_help_imports_no_heavy_library(argv) -> None:
    """``diffora --help`` took 10-13 s because torch, transformers and peft loaded before argparse ran."""
    code = (
        "import json, sys\nfrom diffora.cli.app import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
        "    pass\nheavy = ('torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    loaded = json.loads(done.stderr.strip().splitlines()[-1])
    assert loaded == [], f"'diffora {' '.join(argv)}' imported {loaded}"
    assert "usage: diffora" in done.stdout or "diffora " in done.stdout


def test_resume_reads_an_option_the_checkpoint_predates_at_its_default():
    # A checkpoint written before search_levels existed resumes while it keeps its default, and only then.
    from diffora.cli.commands import _check_same_options

    opts = Options()
    saved = {k: v for k, v in vars(opts).items() if k != "search_levels"}
    _check_same_options(saved, opts)
    with pytest.raises(ConfigError, match="these differ: search_levels .was 'bi', now 'single'"):
        _check_same_options(saved, dataclasses.replace(opts, search_levels="single"))
    with pytest.raises(ConfigError, match="these differ: seed .was 3, now 0"):
        _check_same_options({**saved, "seed": 3}, opts)
