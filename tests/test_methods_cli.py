"""``--import MODULE``: the policy commands import a user's module so that its scorers can be named."""

from __future__ import annotations

import textwrap

import pytest

from momentkv.cli.main import main

SCORER_MODULE = textwrap.dedent('''
    import momentkv
    from pydantic import Field


    @momentkv.register_scorer("{name}")
    class Stride(momentkv.Scorer):
        """Keeps every ``stride``-th token."""

        needs_attention = False
        stride: int = Field(4, ge=1)

        def update(self, ctx):
            return (ctx.positions % self.stride == 0).float()
''')


def write_module(folder, module: str, scorer: str):
    path = folder / f"{module}.py"
    path.write_text(SCORER_MODULE.format(name=scorer))
    policy = folder / f"{module}_policy.yaml"
    policy.write_text(f"name: strided\ndecode:\n  budget: 16\n  scorers:\n    - {{type: {scorer}, stride: 8}}\n")
    return path, policy


def test_validate_and_show_import_a_file(tmp_path, capsys):
    module, policy = write_module(tmp_path, "cli_scorers_file", "cli_test_stride_file")
    assert main(["validate", str(policy)]) == 1
    assert "unknown scorer type 'cli_test_stride_file'" in capsys.readouterr().err
    assert main(["validate", "--import", str(module), str(policy), "h2o"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{policy}: ok: strided") and "cli_test_stride_file(stride=8)" in out[0]
    assert out[1].startswith("h2o: ok: h2o")
    assert main(["show", "--import", str(module), str(policy)]) == 0
    assert "type: cli_test_stride_file" in capsys.readouterr().out


def test_import_a_module_by_name_from_the_current_folder(tmp_path, monkeypatch, capsys):
    _, policy = write_module(tmp_path, "cli_scorers_by_name", "cli_test_stride_name")
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--import", "json", "--import", "cli_scorers_by_name", str(policy)]) == 0
    assert "cli_test_stride_name(stride=8)" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["validate", "moment"], ["show", "moment"], ["bench", "--lengths", "4"],
                                     ["eval", "--out", "TMP/never-written"]])
def test_a_module_that_fails_to_import_exits_2(tmp_path, capsys, command):
    command = [part.replace("TMP", str(tmp_path)) for part in command]
    broken = tmp_path / "cli_broken_scorers.py"
    broken.write_text("import momentkv\nraise RuntimeError('no GPU here')\n")
    code = main([command[0], "--import", str(broken), *command[1:]])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--import {broken}: cannot import it: RuntimeError: no GPU here" in err
    assert main([command[0], "--import", "no_such_module_anywhere", *command[1:]]) == 2
    assert "no_such_module_anywhere: cannot import it: ModuleNotFoundError" in capsys.readouterr().err
    assert main([command[0], "--import", str(tmp_path / "missing.py"), *command[1:]]) == 2
    assert "missing.py: no such file" in capsys.readouterr().err
    assert not (tmp_path / "never-written").exists()


def test_a_module_registering_a_taken_name_is_reported(tmp_path, capsys):
    clash = tmp_path / "cli_clash.py"
    clash.write_text("import momentkv\n\n@momentkv.register_scorer('ema')\nclass Mine(momentkv.Scorer):\n"
                     "    def update(self, ctx):\n        return ctx.age\n")
    assert main(["validate", "--import", str(clash), "moment"]) == 2
    assert "already registered" in capsys.readouterr().err
