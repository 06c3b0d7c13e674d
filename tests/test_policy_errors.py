"""Error reporting: file, line, field path and expectation; all at once; fuzzing never escapes PolicyError."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from datetime import timedelta

import pytest
import yaml
from pydantic import ValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from momentkv import Policy, PolicyError, load_policy, testing
from momentkv.cli.main import main
from momentkv.policy import dump_policy, dump_policy_data, loads_policy
from momentkv.policy.loader import MAX_DEPTH, MAX_NODES, MAX_TEXT
from momentkv.scoring import scorer_names

BAD = """\
name: broken
decode:
  budget: 64
  windw: 3
  granularity: heads
  scorers:
    - type: ema
      alpha: 1.5
    - type: nosuch
    - type: recency
      wieght: 2
"""


def test_every_error_of_a_file_at_once_with_file_line_and_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BAD)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.problems == [
        f"{path}:4 decode.windw: unknown field (fields: budget, sinks, recent, cadence, granularity, scope, "
        "uncompressed_layers, scorers)",
        f"{path}:5 decode.granularity: must be 'head' or 'layer', got 'heads'",
        f"{path}:8 decode.scorers[0].alpha: must be in (0, 1], got 1.5",
        f"{path}:9 decode.scorers[1].type: unknown scorer type 'nosuch'; known: {', '.join(scorer_names())}",
        f"{path}:11 decode.scorers[2].wieght: unknown field; did you mean 'weight'? (fields: type, weight, normalize)",
    ]
    assert [(d.line, d.path) for d in info.value.details] == [
        (4, "decode.windw"), (5, "decode.granularity"), (8, "decode.scorers[0].alpha"),
        (9, "decode.scorers[1].type"), (11, "decode.scorers[2].wieght"),
    ]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("decode:\n  budget: 1\n  budget: 2\n", "t.yaml:3 decode.budget: duplicate key 'budget' (first on line 2)"),
        ("decode: [1, 2\n", "t.yaml:2: invalid YAML:"),
        ("- 1\n- 2\n", "t.yaml:1: a policy is a mapping of fields, got a list"),
        ("", "t.yaml: empty"),
        ("name: !!python/object/apply:os.system [ls]\n", "t.yaml:1 name: tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
        ("base: &b {name: x}\n<<: *b\n", "t.yaml:2: merge keys (<<) are not supported"),
        ("name: !!binary aGVsbG8=\n", "t.yaml:1 name: a bytes"),
        ("? [a, b]\n: 1\n", "t.yaml:1: a key must be a plain name"),
        ("decode:\n  budget: 8\n  scorers:\n  - {type: ema, alpha: 0}\n",
         "t.yaml:4 decode.scorers[0].alpha: must be in (0, 1], got 0"),
        ("decode:\n  budget: {ratio: 0.5, floor: 8, cap: 2}\n  scorers: [ema]\n",
         "t.yaml:2 decode.budget.cap: must be at least floor (8), got 2"),
        ("decode:\n  budget: [8, 0]\n  scorers: [ema]\n", "t.yaml:2 decode.budget[1]: must be >= 1, got 0"),
        ("decode:\n  sinks: 1\n", "t.yaml:1 decode.budget: required field is missing"),
        ("prefill: {type: nosuch}\n", "t.yaml:1 prefill.type: unknown prefill compressor type 'nosuch'"),
        ("name: 7\n", "t.yaml:1 name: must be text, got 7"),
    ],
)
def test_message_names_line_path_and_expectation(text, expected):
    with pytest.raises(PolicyError) as info:
        loads_policy(text, "t.yaml")
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_no_such_file_or_builtin():
    with pytest.raises(PolicyError, match="not a built-in policy; built-ins: .*moment.yaml"):
        load_policy("no-such-policy.yaml")


@pytest.mark.parametrize(("text", "expected"), [
    # the tags of unions never appear in a path (they used to: prefill.capacity.constrained-float)
    ("prefill: {type: snapkv, capacity: '128'}\n",
     "t.yaml:1 prefill.capacity: must be an integer (prompt tokens) or a number in (0, 1]"),
    ("prefill: {type: knorm, capacity: 1.5}\n", "t.yaml:1 prefill.capacity: must be in (0, 1], got 1.5"),
    ("decode:\n  budget: {ratio: 2.0}\n  scorers: [ema]\n", "t.yaml:2 decode.budget.ratio: must be in (0, 1], got 2.0"),
    ("decode:\n  budget: 8\n  sinks: -1\n  scorers: [ema]\n", "t.yaml:3 decode.sinks: must be >= 0, got -1"),
])
def test_paths_are_the_fields_written(text, expected):
    with pytest.raises(PolicyError) as info:
        loads_policy(text, "t.yaml")
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems
    for detail in info.value.details:  # only field names and indices: no union tag, no validator name
        assert not any(tag in detail.path for tag in (":", "constrained", "tokens", "function", "-")), detail


def test_alias_bomb_is_refused_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    start = time.perf_counter()
    with pytest.raises(PolicyError, match=f"more than {MAX_NODES} nodes"):
        loads_policy("\n".join(lines))
    assert time.perf_counter() - start < 5.0


def test_deep_nesting_and_recursive_alias_are_refused():
    with pytest.raises(PolicyError, match="nested deeper than"):
        loads_policy("a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5))
    with pytest.raises(PolicyError, match="nested deeper|more than"):
        loads_policy("a: &a [*a]\n")
    with pytest.raises(PolicyError):
        loads_policy("[" * 5000)


@settings(max_examples=150, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=300))
def test_fuzz_arbitrary_text_raises_only_policy_error(text):
    try:
        loads_policy(text, "fuzz.yaml")
    except PolicyError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)


_FIELDS = ["name", "description", "prefill", "decode", "budget", "sinks", "recent", "cadence", "granularity",
           "scope", "uncompressed_layers", "scorers", "type", "alpha", "weight", "normalize", "ratio", "floor",
           "cap", "extends", "ema", "recency", "head", "keep"]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
    st.sampled_from(_FIELDS),
)
_STRUCTURES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=4),
                                                              inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=150, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(st.sampled_from(_FIELDS), _STRUCTURES, max_size=5))
def test_fuzz_arbitrary_structures_raise_only_policy_error(data):
    for load in (lambda: load_policy(data), lambda: loads_policy(yaml.safe_dump(data), "fuzz.yaml")):
        try:
            policy = load()
        except PolicyError as err:
            assert err.problems
        else:
            assert loads_policy(dump_policy(policy)) == policy


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=testing.invalid_policies())
def test_invalid_policies_name_the_expected_field(case):
    with pytest.raises(PolicyError) as info:
        load_policy(case.data)
    problems = [d for d in info.value.details if d.path == case.path]
    assert problems, (case, info.value.problems)
    assert any(case.expect in d.message for d in problems), (case, info.value.problems)
    text = dump_policy_data(case.data)  # quoted as the loader reads YAML (a name "08" is text)
    with pytest.raises(PolicyError) as from_yaml:
        loads_policy(text, "case.yaml")
    lines = text.splitlines()
    placed = [d for d in from_yaml.value.details if d.path == case.path]
    assert placed and all(d.origin == "case.yaml" and d.line is not None for d in placed)
    # the line named holds the offending key (or, for a list item, lies inside the list)
    last = case.path.rsplit(".", 1)[-1].split("[")[0]
    assert any(last in lines[d.line - 1] or lines[d.line - 1].lstrip().startswith("-") for d in placed), (text, placed)


@pytest.mark.parametrize(("written", "value"), [
    ("1e-6", 1e-6), ("5E-1", 0.5), ("-.5", -0.5), ("+.25", 0.25), ("2.5e-1", 0.25), ("1.0e-06", 1e-6),
])
def test_floats_are_read_as_yaml_1_2_reads_them(written, value):
    """PyYAML (YAML 1.1) reads 1e-6 as text; users write floats that way and mean a number."""
    policy = loads_policy(f"decode:\n  budget: 8\n  scorers:\n    - {{type: ema, weight: {written}}}\n")
    assert policy.decode.scorers[0].weight == value
    assert loads_policy(dump_policy(policy)) == policy


def test_the_yaml_1_2_floats_keep_the_loader_strict():
    with pytest.raises(PolicyError) as info:
        loads_policy("decode:\n  budget: 1e3\n  cadence: 2\n  cadence: 1e-6\n  scorers: [ema]\n", "t.yaml")
    assert info.value.problems == ["t.yaml:4 decode.cadence: duplicate key 'cadence' (first on line 3)"]
    with pytest.raises(PolicyError, match=r"t\.yaml:2 decode\.budget: must be an integer, got 1000\.0"):
        loads_policy("decode:\n  budget: 1e3\n  scorers: [ema]\n", "t.yaml")
    assert loads_policy("name: 1e-6x\n").name == "1e-6x"  # not a number: text, as before
    assert yaml.safe_load("x: 1e-6") == {"x": "1e-6"}  # PyYAML's own loader is left as it is


def test_load_policy_takes_yaml_text_and_explains_one_line_yaml():
    text = "name: inline\ndecode:\n  budget: 16\n  recent: {fraction: 0.25}\n  scorers: [ema]\n"
    assert load_policy(text) == loads_policy(text)
    assert load_policy(dump_policy(load_policy("h2o"))) == load_policy("h2o")
    for one_line in ("name: x", "{decode: {budget: 8, scorers: [ema]}}"):
        with pytest.raises(PolicyError) as info:
            load_policy(one_line)
        (problem,) = info.value.problems
        assert "is neither a policy file nor a built-in policy" in problem
        assert "YAML text is taken only when it spans several lines" in problem
    with pytest.raises(PolicyError, match="no such policy file, and not a built-in policy"):
        load_policy("my-policy.yaml")


# ----------------------------------------------------------------- YAML 1.2's core schema, scalar by scalar
@pytest.mark.parametrize(("written", "value"), [
    ("64", 64), ("+64", 64), ("0", 0), ("0o100", 64), ("0x40", 64), ("0x4f", 79),
])
def test_integers_are_read_as_yaml_1_2_reads_them(written, value):
    policy = loads_policy(f"decode:\n  budget: 8\n  uncompressed_layers: [{written}]\n  scorers: [ema]\n")
    assert policy.decode.uncompressed_layers == [value]


@pytest.mark.parametrize(("written", "value"), [
    ("1e-6", 1e-6), ("1.5", 1.5), ("-2", -2), (".5", 0.5), ("1.", 1.0), ("-1E+2", -100.0),
])
def test_floats_of_every_yaml_1_2_form(written, value):
    policy = loads_policy(f"decode:\n  budget: 8\n  scorers:\n    - {{type: ema, weight: {written}}}\n")
    assert policy.decode.scorers[0].weight == value


@pytest.mark.parametrize("written", [".inf", "-.inf", "+.INF", ".nan", ".NaN"])
def test_infinities_and_nan_are_floats_and_refused_where_a_finite_number_belongs(written):
    with pytest.raises(PolicyError) as info:
        loads_policy(f"decode:\n  budget: 8\n  scorers:\n    - {{type: ema, weight: {written}}}\n", "t.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("t.yaml:4 decode.scorers[0].weight: must be a finite number, got "), problem


@pytest.mark.parametrize(("written", "value"), [
    ("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False), ("FALSE", False),
])
def test_booleans_are_only_true_and_false(written, value):
    policy = loads_policy(f"decode:\n  budget: 8\n  scorers:\n    - {{type: ema, bias_correction: {written}}}\n")
    assert policy.decode.scorers[0].bias_correction is value


@pytest.mark.parametrize("written", ["~", "null", "Null", "NULL", ""])
def test_null_forms(written):
    policy = loads_policy(f"decode:\n  budget: {{ratio: 0.5, cap: {written}}}\n  scorers: [ema]\n")
    assert policy.decode.budget.cap is None


@pytest.mark.parametrize(("written", "expected"), [
    # both versions read these as numbers, with different values: refused in every field
    ("064", "064 has a leading zero, which YAML 1.1 reads as octal 52 and YAML 1.2 as 64: write 64, 0o64 for "
            "the octal number, or '064' (quoted) for text"),
    ("08", "08 has a leading zero, which YAML 1.1 reads as text and YAML 1.2 as 8: write 8, or '08' (quoted) "
           "for text"),
    ("-010", "-010 has a leading zero, which YAML 1.1 reads as octal -8 and YAML 1.2 as -10: write -10, or "
             "'-010' (quoted) for text"),
])
def test_a_leading_zero_is_refused_with_both_readings(written, expected):
    with pytest.raises(PolicyError) as info:
        loads_policy(f"name: x\ndecode:\n  budget: {written}\n  scorers: [ema]\n", "t.yaml")
    assert info.value.problems == [f"t.yaml:3 decode.budget: {expected}"]
    with pytest.raises(PolicyError) as info:  # a text field too: quoting is the way to write text
        loads_policy(f"name: {written}\n", "t.yaml")
    assert info.value.problems == [f"t.yaml:1 name: {expected}"]
    assert loads_policy(f"name: '{written}'\n").name == written


_BOOL_FIELD = "budget: 8\n  scorers: [{{type: ema, bias_correction: {}}}]"


@pytest.mark.parametrize(("decode", "written", "expected"), [
    ("budget: {}\n  scorers: [ema]", "1_000", "decode.budget: must be an integer, a {ratio, floor, cap} mapping, "
     "or a list of integers, got '1_000'; YAML 1.2 reads 1_000 as text (YAML 1.1 as 1000): write 1000"),
    ("budget: 8\n  cadence: {}\n  scorers: [ema]", "1:30", "decode.cadence: must be an integer, got '1:30'; "
     "YAML 1.2 reads 1:30 as text (YAML 1.1 as 90 (base 60)): write 90"),
    ("budget: 8\n  cadence: {}\n  scorers: [ema]", "0b11", "decode.cadence: must be an integer, got '0b11'; "
     "YAML 1.2 reads 0b11 as text (YAML 1.1 as 3): write 3"),
    ("budget: 8\n  recent: {}\n  scorers: [ema]", "-0x10", "decode.recent: must be an integer (tokens) or "
     "{fraction: f} (a share of the layer's budget), got '-0x10'; YAML 1.2 reads -0x10 as text (YAML 1.1 as "
     "-16): write -16"),
    (_BOOL_FIELD, "yes", "decode.scorers[0].bias_correction: must be true or false, got 'yes'; YAML 1.2 reads "
     "yes as text (YAML 1.1 as true): write true"),
    (_BOOL_FIELD, "on", "decode.scorers[0].bias_correction: must be true or false, got 'on'; YAML 1.2 reads "
     "on as text (YAML 1.1 as true): write true"),
    (_BOOL_FIELD, "no", "decode.scorers[0].bias_correction: must be true or false, got 'no'; YAML 1.2 reads "
     "no as text (YAML 1.1 as false): write false"),
    (_BOOL_FIELD, "Off", "decode.scorers[0].bias_correction: must be true or false, got 'Off'; YAML 1.2 reads "
     "Off as text (YAML 1.1 as false): write false"),
    ("budget: 8\n  scorers: [{{type: ema, alpha: {}}}]", "0_5.5", "decode.scorers[0].alpha: must be a number, "
     "got '0_5.5'; YAML 1.2 reads 0_5.5 as text (YAML 1.1 as 5.5): write 5.5"),
])
def test_yaml_1_1_forms_are_text_and_a_number_field_says_what_to_write(decode, written, expected):
    text = f"name: x\ndecode:\n  {decode.format(written)}\n"
    line = 1 + next(i for i, row in enumerate(text.splitlines()) if written in row)
    with pytest.raises(PolicyError) as info:
        loads_policy(text, "t.yaml")
    assert info.value.problems == [f"t.yaml:{line} {expected}"]


def test_the_hint_is_given_only_for_yaml():
    """A str in a mapping is text whatever it looks like: no word about YAML's versions."""
    with pytest.raises(PolicyError) as info:
        load_policy({"decode": {"budget": "1_000", "scorers": ["ema"]}})
    assert "YAML" not in str(info.value)
    with pytest.raises(PolicyError) as info:  # quoted: text in both versions
        loads_policy("decode:\n  budget: '1000'\n  scorers: [ema]\n")
    assert "YAML" not in str(info.value)


@pytest.mark.parametrize("written", ["yes", "no", "on", "off", "Yes", "NO", "y", "n", "1_000", "1:30", "0b11",
                                     "2024-01-01", "-0x10", "=", "0X40", "1e", "0o8"])
def test_yaml_1_1_forms_are_text_in_a_text_field(written):
    policy = loads_policy(f"name: {written}\ndescription: {written}\n")
    assert (policy.name, policy.description) == (written, written)
    assert loads_policy(dump_policy(policy)) == policy


# ----------------------------------------------------------------- paths that are not policy files
def test_a_directory_is_named_as_one(tmp_path, capsys):
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    assert info.value.problems == [f"{tmp_path}: {str(tmp_path)!r} is a directory, not a policy file"]
    (tmp_path / "sub").mkdir()
    with pytest.raises(PolicyError) as info:
        loads_policy("name: x\nextends: sub\n", "e.yaml", base_dir=tmp_path)
    assert info.value.problems == [f"e.yaml:2 extends: 'sub' ({tmp_path / 'sub'}) is a directory, not a policy file"]
    with pytest.raises(PolicyError, match=r"e\.yaml:1 extends: '/' is a directory, not a policy file"):
        loads_policy("extends: /\n", "e.yaml", base_dir=tmp_path)
    assert main(["validate", str(tmp_path)]) == 1
    assert "is a directory, not a policy file" in capsys.readouterr().err
    (tmp_path / "moment").mkdir()  # a folder does not hide the built-in of that name
    assert loads_policy("extends: moment\n", "e.yaml", base_dir=tmp_path) == load_policy("moment")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_named_as_one():
    with pytest.raises(PolicyError) as info:
        load_policy("/dev/zero")
    assert info.value.problems == ["/dev/zero: '/dev/zero' is a character device, not a policy file"]
    with pytest.raises(PolicyError, match=r"e\.yaml:1 extends: '/dev/zero' is a character device"):
        loads_policy("extends: /dev/zero\n", "e.yaml")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_is_named_as_one_and_never_opened(tmp_path):
    pipe = tmp_path / "p.yaml"
    os.mkfifo(pipe)  # opening it would block until a writer came
    with pytest.raises(PolicyError) as info:
        load_policy(pipe)
    assert info.value.problems == [f"{pipe}: {str(pipe)!r} is a named pipe (FIFO), not a policy file"]


def test_a_large_file_is_refused_after_reading_at_most_the_limit(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(50 * MAX_TEXT)  # sparse: 50 MB of NUL bytes that take no disk
    tracemalloc.start()
    try:
        with pytest.raises(PolicyError) as info:
            load_policy(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.problems == [f"{path}: file too large: {50 * MAX_TEXT:,} bytes, at most {MAX_TEXT:,}"]
    assert peak < 3 * MAX_TEXT, peak
    with pytest.raises(PolicyError, match=r"e\.yaml:1 extends: file too large"):
        loads_policy("extends: huge.yaml\n", "e.yaml", base_dir=tmp_path)
    path.write_text("name: x\n" + "#" * (MAX_TEXT - 8))  # exactly the limit: read
    assert load_policy(path).name == "x"


@pytest.mark.parametrize(("written", "suggestion"), [
    ("moment.yml", "moment.yaml"), ("momnet", "moment"), ("moment-paper.yml", "moment-paper.yaml"),
    ("h2o.yml", "h2o.yaml"), ("snapkv_moment", "snapkv-moment"),
])
def test_a_near_name_of_a_builtin_gets_a_suggestion(written, suggestion, tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy(written)
    (problem,) = info.value.problems
    assert f"no such policy file, and not a built-in policy; did you mean {suggestion!r}?" in problem
    with pytest.raises(PolicyError, match=f"did you mean {suggestion!r}"):
        loads_policy(f"extends: {written}\n", "e.yaml", base_dir=tmp_path)
    with pytest.raises(PolicyError) as info:
        load_policy("zzzz-nothing-like-it.yaml")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(("name", "shown"), [
    ("a\x00b", "U+0000 at position 1"), ("\x1b[31mred", "U+001B at position 0"), ("tab\there", "U+0009 at position 3"),
    ("two\nlines", "U+000A at position 3"), ("nel\x85", "U+0085 at position 3"), ("sep\u2028x", "U+2028 at position 3"),
    ("del\x7f", "U+007F at position 3"),
])
def test_a_name_with_a_control_character_is_refused(name, shown):
    expected = f"must be one line of printable text: control character {shown}"
    with pytest.raises(PolicyError) as info:
        load_policy({"name": name})
    assert [(d.path, d.message) for d in info.value.details] == [("name", expected)]
    with pytest.raises(PolicyError) as info:  # written in YAML with an escape
        loads_policy(f"name: {json.dumps(name)}\n", "t.yaml")
    assert info.value.problems == [f"t.yaml:1 name: {expected}"]
    with pytest.raises(ValidationError):
        Policy(name=name)
    assert Policy(name="ünïcode name — fine ✓").name == "ünïcode name — fine ✓"
