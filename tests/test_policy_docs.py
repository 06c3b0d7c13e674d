"""The docs say what the code does: the reference is generated from the schema, every example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import momentkv
from momentkv.policy import loads_policy
from momentkv.policy.field_reference import BEGIN, END, render_reference, splice

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _blocks(name: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (DOCS / name).read_text(encoding="utf-8"), re.S)


def test_reference_is_generated_from_the_schema():
    text = (DOCS / "policies.md").read_text(encoding="utf-8")
    assert BEGIN in text and END in text
    assert splice(text, render_reference()) == text, (
        "docs/policies.md is out of date: run python -m momentkv.policy.field_reference docs/policies.md"
    )


def test_reference_lists_every_field():
    reference = render_reference()
    for model in (momentkv.Policy, momentkv.DecodePolicy, momentkv.RatioBudget, momentkv.Scorer):
        for field in model.model_fields:
            assert f"`{field}`" in reference


@pytest.fixture(scope="module")
def custom_scorer_namespace():
    namespace: dict = {}
    for block in _blocks("custom-scorers.md", "python"):
        exec(compile(block, "custom-scorers.md", "exec"), namespace)  # noqa: S102  (our own docs)
    return namespace


def test_custom_scorer_doc_examples_run(custom_scorer_namespace):
    tests = {k: v for k, v in custom_scorer_namespace.items() if k.startswith("test_")}
    assert len(tests) >= 2
    for test in tests.values():
        test()


@pytest.mark.parametrize("doc", ["policies.md", "custom-scorers.md"])
def test_every_yaml_example_validates(doc, custom_scorer_namespace):
    blocks = _blocks(doc, "yaml")
    assert blocks
    for block in blocks:
        loads_policy(block, doc)


def test_policies_doc_python_example_runs():
    for block in _blocks("policies.md", "python"):
        exec(compile(block, "policies.md", "exec"), {})  # noqa: S102


def test_documented_error_message_is_the_real_one(custom_scorer_namespace):
    text = (DOCS / "custom-scorers.md").read_text(encoding="utf-8")
    claimed = re.search(r"fails with `(landmarks\.yaml:[^`]*)`", text).group(1)
    block = _blocks("custom-scorers.md", "yaml")[0].replace("stride: 16", "stride: 1")
    with pytest.raises(momentkv.PolicyError) as info:
        loads_policy(block, "landmarks.yaml")
    assert info.value.problems == [claimed]
