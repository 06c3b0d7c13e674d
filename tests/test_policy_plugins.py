"""One component framework: scorers and prefill compressors share the registry rules, strictness and entry
points, and a broken plugin never breaks the built-ins (a warning, then the same PolicyError every time)."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import ConfigDict, Field, ValidationError

import momentkv
from momentkv import PolicyError, load_policy
from momentkv.cli.main import main
from momentkv.policy import loads_policy
from momentkv.prefill.base import PREFILL, BudgetedCompressor, PrefillCompressor
from momentkv.registry import PluginWarning
from momentkv.scoring.registry import SCORERS

REGISTRIES = [(SCORERS, momentkv.Scorer), (PREFILL, PrefillCompressor)]


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install a package (a dist-info folder on sys.path) declaring entry points; the registries read the
    entry points afresh and forget the package afterwards."""
    for registry, _ in REGISTRIES:
        monkeypatch.setattr(registry, "_scanned", False)
        monkeypatch.setattr(registry, "_failures", {})
        monkeypatch.setattr(registry, "_classes", dict(registry._classes))

    def install(dist: str, entry_points: str, modules: dict[str, str] | None = None):
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
        for name, source in (modules or {}).items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))

    return install


def test_a_broken_scorer_plugin_warns_and_the_builtins_keep_working(installed, tmp_path, capsys):
    installed("broken-plugin", """
        [momentkv.scorers]
        shiny = broken_plugin_missing.scorers:Shiny
    """)
    assert main(["validate", "moment"]) == 0  # built-in names need no plugin: nothing is loaded
    assert capsys.readouterr().out.startswith("moment: ok")
    # The policy that names the broken scorer: a warning once, and the same error every time, naming the
    # package, the entry point and the cause.
    messages = []
    with pytest.warns(PluginWarning, match=r"entry point 'shiny = broken_plugin_missing\.scorers:Shiny' "
                                           r"\(group momentkv\.scorers\) of package broken-plugin 1\.0"):
        for _ in range(2):
            with pytest.raises(PolicyError) as info:
                loads_policy("decode:\n  budget: 8\n  scorers: [ema, shiny]\n", "p.yaml")
            messages.append(info.value.problems)
    assert load_policy("moment") == load_policy("moment.yaml")
    assert "shiny" not in momentkv.scoring.scorer_names()
    # A misspelt name lists the known scorers (every plugin is loaded for that); the broken one stays out.
    (tmp_path / "typo.yaml").write_text("decode:\n  budget: 8\n  scorers: [emma]\n")
    assert main(["validate", str(tmp_path / "typo.yaml")]) == 1
    assert "unknown scorer type 'emma'" in capsys.readouterr().err
    assert messages[0] == messages[1]
    (problem,) = messages[0]
    assert problem.startswith("p.yaml:3 decode.scorers[1].type: scorer type 'shiny' cannot be used: the entry point "
                              "'shiny = broken_plugin_missing.scorers:Shiny' (group momentkv.scorers) of package "
                              "broken-plugin 1.0 failed to load (ModuleNotFoundError")


def test_a_plugin_that_registers_nothing_under_its_name_is_reported(installed):
    installed("misnamed-plugin", """
        [momentkv.prefill]
        halfprompt = misnamed_prefill:Half
    """, {"misnamed_prefill": """
        import momentkv

        class Half(momentkv.prefill.BudgetedCompressor):
            '''Never registered: the entry point alone does not register a class.'''
    """})
    with pytest.warns(PluginWarning, match="loaded, but registers no prefill compressor named 'halfprompt'"):
        with pytest.raises(PolicyError, match="prefill compressor type 'halfprompt' cannot be used"):
            load_policy({"prefill": {"type": "halfprompt"}})
    assert load_policy("snapkv-moment").prefill.type == "snapkv"


def test_working_plugins_of_both_kinds_load_through_their_entry_points(installed):
    installed("good-plugin", """
        [momentkv.scorers]
        plugin_oldest = good_plugin:Oldest
        [momentkv.prefill]
        plugin_head = good_plugin:Head
    """, {"good_plugin": """
        import momentkv
        from momentkv.prefill import BudgetedCompressor, keep_top

        @momentkv.register_scorer("plugin_oldest")
        class Oldest(momentkv.Scorer):
            '''The oldest tokens score highest.'''
            needs_attention = False

            def update(self, ctx):
                return ctx.age

        @momentkv.register_prefill("plugin_head")
        class Head(BudgetedCompressor):
            '''The first prompt tokens.'''

            def select(self, ctx, capacity):
                import torch
                order = -torch.arange(ctx.keys.shape[2], dtype=torch.float32).expand(ctx.keys.shape[:3])
                return keep_top(order, ctx.valid, capacity)
    """})
    policy = loads_policy("prefill: {type: plugin_head, capacity: 4}\n"
                          "decode:\n  budget: 4\n  scorers: [plugin_oldest]\n")
    assert (policy.prefill.type, policy.prefill.capacity, policy.decode.scorers[0].type) == \
        ("plugin_head", 4, "plugin_oldest")
    assert "plugin_oldest" in momentkv.scoring.scorer_names()
    assert "plugin_head" in momentkv.prefill.prefill_names()


@pytest.mark.parametrize(("registry", "base"), REGISTRIES, ids=["scorer", "prefill"])
def test_one_set_of_registration_rules_for_every_kind(registry, base, monkeypatch):
    monkeypatch.setattr(registry, "_classes", dict(registry._classes))
    with pytest.raises(ValueError, match=f"a {registry.kind} name must be an identifier"):
        registry.register("two words")
    with pytest.raises(TypeError, match=f"needs a subclass of {base.__name__}"):
        registry.register("test_plugins_int")(int)
    taken = registry.names()[0]
    with pytest.raises(ValueError, match=f"a {registry.kind} named '{taken}' is already registered"):
        registry.register(taken)(type("Other", (base,), {}))

    class Loose(base):
        model_config = ConfigDict(strict=False)

    with pytest.raises(TypeError, match=r"relaxes validation \(strict=False\)"):
        registry.register("test_plugins_loose")(Loose)

    class Fine(base):
        """A component of this kind (a scorer implements update; a compressor that keeps all needs nothing)."""

        def update(self, ctx):
            return ctx.age

    first = registry.register("test_plugins_fine")(Fine)
    again = registry.register("test_plugins_fine")(Fine)  # the same class again (a reloaded module): replaced
    assert registry.get("test_plugins_fine") is again is not first
    assert again().type == "test_plugins_fine"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("window", True, "must be an integer, got true"),
    ("capacity", "128", "must be an integer (prompt tokens) or a number in (0, 1] (a fraction of the prompt), "
                        "got '128'"),
    ("capacity", 1.5, "must be in (0, 1], got 1.5"),
    ("capacity", 0, "must be >= 1, got 0"),
    ("kernel", 7.0, "must be an integer, got 7.0"),
])
def test_prefill_components_are_strict_like_scorers(field, value, message):
    with pytest.raises(PolicyError) as info:
        load_policy({"prefill": {"type": "snapkv", field: value}})
    assert [(d.path, d.message) for d in info.value.details] == [(f"prefill.{field}", message)]


def test_prefill_python_api_is_strict():
    with pytest.raises(ValidationError):
        momentkv.prefill.SnapKV(window=True)
    custom = type("Custom", (BudgetedCompressor,), {"__annotations__": {"depth": int}, "depth": Field(1, ge=1)})
    assert custom.model_config["strict"] is True


def test_a_scorer_without_update_is_refused_at_registration(monkeypatch):
    """Without the check, generate() would fail with a bare NotImplementedError, steps into decoding."""
    monkeypatch.setattr(SCORERS, "_classes", dict(SCORERS._classes))

    class NoUpdate(momentkv.Scorer):
        needs_attention = False

    with pytest.raises(PolicyError) as info:
        momentkv.register_scorer("test_plugins_no_update")(NoUpdate)
    assert info.value.problems == [
        "scorer NoUpdate (registered as 'test_plugins_no_update') does not implement update(self, ctx), which the "
        "Scorer contract requires",
    ]
    assert "test_plugins_no_update" not in SCORERS.names()


@pytest.mark.parametrize(("body", "problem"), [
    ("def update(self):\n    return None", "has update(self), which cannot be called as update(self, ctx)"),
    ("def update(self, ctx, extra):\n    return None",
     "has update(self, ctx, extra), which cannot be called as update(self, ctx)"),
    ("update: typing.ClassVar[int] = 3", "has update = 3, not a method update(self, ctx)"),
    ("def update(self, ctx):\n    return ctx.age\ndef every_step(self, step):\n    return True",
     "has every_step(self, step), which cannot be called as every_step(self)"),
    ("def update(self, ctx):\n    return ctx.age\nneeds_attention = 'no'",
     "has needs_attention = 'no', not a bool as Scorer.needs_attention"),
    ("def update(self, ctx):\n    return ctx.age\nstate_channels = 2.0",
     "has state_channels = 2.0, not an int as Scorer.state_channels"),
])
def test_a_scorer_breaking_the_contract_is_refused_naming_what(body, problem, monkeypatch):
    monkeypatch.setattr(SCORERS, "_classes", dict(SCORERS._classes))
    namespace: dict = {}
    exec("import typing\nclass Bad(momentkv.Scorer):\n" + textwrap.indent(body, "    "),  # noqa: S102
         {"momentkv": momentkv}, namespace)
    with pytest.raises(PolicyError) as info:
        momentkv.register_scorer("test_plugins_bad")(namespace["Bad"])
    assert info.value.problems == [f"scorer Bad (registered as 'test_plugins_bad') {problem}"]


def test_the_contract_allows_every_form_of_a_method(monkeypatch):
    monkeypatch.setattr(SCORERS, "_classes", dict(SCORERS._classes))

    class Flexible(momentkv.Scorer):
        needs_attention = False
        state_channels = 2

        def update(self, ctx, *rest, scale=1.0):  # more than the contract asks is fine
            return ctx.age * scale

        @staticmethod
        def every_step():
            return False

    assert momentkv.register_scorer("test_plugins_flexible")(Flexible)().every_step() is False


def test_a_prefill_compressor_that_keeps_fewer_tokens_must_select_them(monkeypatch):
    monkeypatch.setattr(PREFILL, "_classes", dict(PREFILL._classes))

    class NoSelect(BudgetedCompressor):
        """Keeps a capacity of tokens, but never says which."""

    with pytest.raises(PolicyError) as info:
        momentkv.prefill.register_prefill("test_plugins_no_select")(NoSelect)
    assert info.value.problems == [
        "prefill compressor NoSelect (registered as 'test_plugins_no_select') does not implement select(self, ctx, "
        "capacity), which the PrefillCompressor contract requires",
    ]

    class KeepsAll(PrefillCompressor):
        """layer_capacity left as the base's (None: keep every prompt token), so select is never called."""

    assert momentkv.prefill.register_prefill("test_plugins_keeps_all")(KeepsAll)().type == "test_plugins_keeps_all"
