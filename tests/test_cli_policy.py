"""momentkv validate / policies / show: output and exit codes."""

from __future__ import annotations

import argparse

import pytest

from momentkv.cli.main import main
from momentkv.policy import builtin_policy_names, load_policy, loads_policy


def test_validate_valid_files(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("extends: moment\nname: mine\n")
    assert main(["validate", str(path), "h2o.yaml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: ok: mine; budget 128 tokens")
    assert out[1].startswith("h2o.yaml: ok: h2o")
    assert len(out) == 2


def test_validate_reports_every_error_and_fails(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode:\n  budget: 0\n  granularity: x\n  scorers: [ema]\n")
    assert main(["validate", "moment", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("moment: ok")
    assert captured.err.splitlines() == [
        f"{bad}:2 decode.budget: must be >= 1, got 0",
        f"{bad}:3 decode.granularity: must be 'head' or 'layer', got 'x'",
    ]


def test_policies_lists_each_builtin_once(capsys):
    assert main(["policies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == builtin_policy_names()
    assert all(load_policy(line.split()[0]).description in line for line in lines)


def test_show_prints_the_resolved_policy(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("extends: moment\ndecode:\n  budget: 64\n")
    assert main(["show", str(path)]) == 0
    shown = loads_policy(capsys.readouterr().out)
    assert shown == load_policy(path)
    assert shown.decode.budget == 64
    assert main(["show", "no-such"]) == 1


def test_validate_missing_file_fails(capsys):
    assert main(["validate", "no-such.yaml"]) == 1
    assert "no such policy file" in capsys.readouterr().err


def test_version_is_the_package_version(capsys):
    from importlib.metadata import version

    import momentkv

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"momentkv {momentkv.__version__}"
    assert momentkv.__version__ == version("momentkv")


DOCUMENTED_COMMANDS = ("validate", "policies", "show", "bench", "eval", "demo", "report", "tune", "needle")


def test_every_option_of_these_commands_is_documented():
    from momentkv.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    undocumented = [
        f"{name} {action.option_strings or action.dest}"
        for name in DOCUMENTED_COMMANDS for action in commands[name]._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert undocumented == []


def test_every_command_has_a_description_in_its_help(capsys):
    from momentkv.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) >= {"validate", "policies", "show", "bench", "eval", "demo", "report", "tune", "lm-eval"}
    missing = [name for name, sub in commands.items() if len((sub.description or "").strip()) < 20]
    assert missing == []
    for name in ("policies", "bench"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        usage, _, rest = capsys.readouterr().out.partition("\n\n")
        assert rest.startswith(commands[name].description.split()[0])  # the description follows the usage
