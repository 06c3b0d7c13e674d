"""extends: built-in or relative bases, deep-merge rules, cycles, and errors placed in the file that wrote them."""

from __future__ import annotations

import pytest

from momentkv import PolicyError, load_policy
from momentkv.policy import dump_policy, loads_policy, merge_policy_data


def test_extends_builtin_overrides_only_what_it_names():
    base = load_policy("moment.yaml")
    policy = loads_policy("extends: moment.yaml\nname: moment-64\ndecode:\n  budget: 64\n")
    assert policy.name == "moment-64"
    assert policy.decode.budget == 64
    assert policy.decode.recent == base.decode.recent
    assert policy.decode.scorers == base.decode.scorers
    assert policy.description == "Extends moment.yaml, changing decode.budget."


def test_description_is_inherited_only_while_the_method_is():
    """The base's description describes the base's prefill and decode: a policy that changes either and
    writes no description gets one saying what it changed, not the base's."""
    assert loads_policy("extends: h2o\nname: mine\n").description == load_policy("h2o").description
    assert loads_policy("extends: h2o\ndescription: Mine.\ndecode: {budget: 64}\n").description == "Mine."
    changed = loads_policy("extends: moment\nprefill: {type: snapkv, capacity: 64}\n"
                           "decode:\n  recent: 4\n  scorers: [recency]\n")
    assert changed.description == "Extends moment.yaml, changing prefill, decode.recent, decode.scorers."
    assert loads_policy("extends: moment\ndecode: null\n").description == "Extends moment.yaml, changing decode."
    # through a chain, each step follows the rule
    assert loads_policy("extends: snapkv-moment\nname: x\n").description == load_policy("snapkv-moment").description


def test_merge_rules():
    base = {"a": {"x": 1, "y": [1, 2]}, "s": [{"type": "ema", "alpha": 0.5}], "c": {"type": "ema", "alpha": 0.5}}
    merged = merge_policy_data(base, {"a": {"y": [3]}, "s": [{"type": "ema"}], "c": {"type": "recency"}})
    assert merged == {"a": {"x": 1, "y": [3]}, "s": [{"type": "ema"}], "c": {"type": "recency"}}
    assert merge_policy_data(base, {"c": {"alpha": 0.7}})["c"] == {"type": "ema", "alpha": 0.7}
    assert merge_policy_data({"decode": {"budget": 8}}, {"decode": None}) == {"decode": None}


def test_decode_null_and_component_replacement():
    assert loads_policy("extends: moment\ndecode: null\n").decode is None
    policy = loads_policy("extends: moment\ndecode:\n  budget: {ratio: 0.5, floor: 16}\n")
    assert policy.decode.budget.ratio == 0.5


def test_relative_extends_chain_and_errors_point_at_the_writing_file(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text(
        "decode:\n  budget: 32\n  recent: 4\n  scorers:\n    - {type: ema, alpha: 0.8}\n"
    )
    (tmp_path / "mid.yaml").write_text("extends: shared/base.yaml\nname: mid\n")
    (tmp_path / "top.yaml").write_text("extends: mid.yaml\ndescription: top\ndecode:\n  sinks: 2\n")
    policy = load_policy(tmp_path / "top.yaml")
    assert (policy.name, policy.description, policy.decode.sinks, policy.decode.budget) == ("mid", "top", 2, 32)
    assert loads_policy(dump_policy(policy)) == policy

    (tmp_path / "bad.yaml").write_text("extends: mid.yaml\ndecode:\n  sinks: -1\n  recent: 40\n")
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "bad.yaml")
    assert [(d.origin, d.line, d.path) for d in info.value.details] == [
        (str(tmp_path / "bad.yaml"), 3, "decode.sinks")
    ]
    # a rule between two fields points at the one this file wrote, and names the other with its place
    (tmp_path / "bad2.yaml").write_text("extends: mid.yaml\n\n\ndecode:\n  recent: 40\n")
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "bad2.yaml")
    (detail,) = info.value.details
    assert (detail.origin, detail.line, detail.path) == (str(tmp_path / "bad2.yaml"), 5, "decode.recent")
    assert detail.message == (f"must be at most 32 (the budget 32 minus sinks 0), got 40; decode.budget is 32 "
                              f"({tmp_path / 'shared' / 'base.yaml'}:2)")


def test_cycles_are_detected(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("name: b\nextends: a.yaml\n")
    with pytest.raises(PolicyError, match=r"extends cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_policy(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("extends: self.yaml\n")
    with pytest.raises(PolicyError, match="extends cycle"):
        load_policy(tmp_path / "self.yaml")


def test_bad_extends_values(tmp_path):
    with pytest.raises(PolicyError) as info:
        loads_policy("name: x\nextends: [moment]\n", "e.yaml")
    assert info.value.problems[0].startswith("e.yaml:2 extends: must be a policy name")
    with pytest.raises(PolicyError) as info:
        loads_policy("extends: nowhere.yaml\n", "e.yaml", base_dir=tmp_path)
    assert info.value.problems[0].startswith("e.yaml:1 extends: 'nowhere.yaml': no such policy file")


def test_extends_in_a_mapping_source():
    assert load_policy({"extends": "tova", "name": "t2"}).decode == load_policy("tova").decode


def test_a_value_from_a_mapping_is_never_blamed_on_the_base_file():
    """The 16 came from the mapping: the problems sit there, and name gkv.yaml's lines for what they met."""
    with pytest.raises(PolicyError) as info:
        load_policy({"extends": "gkv.yaml", "decode": {"budget": 16}})
    assert info.value.problems == [
        "<dict> decode.budget: must be at least 17 (sinks + max(recent, 1) = 17 tokens are protected), got 16; "
        "decode.recent is 17 (gkv.yaml:20)",
        "<dict> decode.budget: must be at least the cadence (128), got 16: between evictions a layer would hold "
        "more than twice its budget; decode.cadence is 128 (gkv.yaml:21)",
    ]
    with pytest.raises(PolicyError) as info:  # a field of its own: the mapping, never a line of gkv.yaml
        load_policy({"extends": "gkv.yaml", "decode": {"sinks": -1}})
    assert [(d.origin, d.line, d.path) for d in info.value.details] == [("<dict>", None, "decode.sinks")]


def test_a_rule_points_at_the_field_the_extending_file_wrote():
    with pytest.raises(PolicyError) as info:
        loads_policy("extends: moment.yaml\ndecode:\n  recent: 200\n", "mine.yaml")
    assert info.value.problems == [
        "mine.yaml:3 decode.recent: must be at most 128 (the budget 128 minus sinks 0), got 200; decode.budget is "
        "128 (moment.yaml:13)",
    ]
    with pytest.raises(PolicyError) as info:  # sinks written here, recent in the base
        loads_policy("extends: gkv.yaml\ndecode:\n  sinks: 120\n", "mine.yaml")
    assert info.value.problems == [
        "mine.yaml:3 decode.sinks: must be at most 111 (the budget 128 minus max(recent, 1) = 17), got 120; "
        "decode.budget is 128 (gkv.yaml:19), decode.recent is 17 (gkv.yaml:20)",
    ]
    with pytest.raises(PolicyError) as info:  # the budget written here: the budget it is
        loads_policy("extends: gkv.yaml\ndecode:\n  budget: [256, 16]\n  cadence: 8\n", "mine.yaml")
    assert info.value.problems == [
        "mine.yaml:3 decode.budget[1]: must be at least 17 (sinks + max(recent, 1) = 17 tokens are protected), "
        "got 16; decode.recent is 17 (gkv.yaml:20)",
    ]
    with pytest.raises(PolicyError) as info:  # both fractions matter; the one written here carries it
        loads_policy("extends: h2o.yaml\ndecode:\n  sinks: {fraction: 0.75}\n", "mine.yaml")
    assert info.value.problems == [
        "mine.yaml:3 decode.sinks.fraction: sinks and recent fractions add up to 1.25: together they may protect "
        "at most the whole budget (1); decode.recent.fraction is 0.5 (h2o.yaml:5)",
    ]


def test_a_ratio_budget_rule_points_at_the_bound_written_last(tmp_path):
    (tmp_path / "base.yaml").write_text("decode:\n  budget: {ratio: 0.5, floor: 4, cap: 8}\n  scorers: [ema]\n")
    with pytest.raises(PolicyError) as info:
        loads_policy("extends: base.yaml\ndecode:\n  budget: {floor: 32}\n", "mine.yaml", base_dir=tmp_path)
    assert info.value.problems == [
        f"mine.yaml:3 decode.budget.floor: must be at most cap (8), got 32; decode.budget.cap is 8 "
        f"({tmp_path / 'base.yaml'}:2)",
    ]
    with pytest.raises(PolicyError) as info:  # one file: the rule's own field, nothing more
        loads_policy("decode:\n  budget: {ratio: 0.5, floor: 32, cap: 8}\n  scorers: [ema]\n", "one.yaml")
    assert info.value.problems == ["one.yaml:2 decode.budget.cap: must be at least floor (32), got 8"]
