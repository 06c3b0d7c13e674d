"""``momentkv bench`` end to end on a tiny model, and the probes it measures with from outside the engine."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import momentkv
from models import prompts, tiny_model
from momentkv.bench import op_count, report
from momentkv.bench.regions import ATTENTION, MODEL, OBSERVE, UPDATE, Regions, watch_layers
from momentkv.bench.runner import UNPATCHED, Summary, run_once
from momentkv.cli.main import main
from momentkv.engine import attention as attention_module
from momentkv.engine.layer import EvictingLayer

SCORING = {"name": "ema-4", "decode": {"budget": 4, "scorers": [{"type": "ema", "alpha": 0.9}]}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama and a word-level tokenizer saved as a local model folder, loadable offline by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 128)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    tiny_model("llama").save_pretrained(folder)
    return folder


def bench(model_dir, out, *args) -> tuple[int, list[dict], str]:
    code = main(["bench", "--model", str(model_dir), "--prompt", "w5 w6 w7 w8 w9 w10", "--lengths", "9",
                 "--repeats", "1", "--out", str(out), *args])
    if code:
        return code, [], ""
    with open(out / "bench.csv") as f:
        table = list(csv.DictReader(f))
    return code, table, (out / "bench.md").read_text()


def test_bench_without_the_full_cache_names_the_reference_of_its_ratios(model_dir, tmp_path):
    code, table, text = bench(model_dir, tmp_path, "--budget", "4", "--policies", "moment.yaml", "recency.yaml")
    assert code == 0
    assert [r["policy"] for r in table] == ["moment", "recency"]
    assert {r["reference"] for r in table} == {"moment"}
    assert "| vs moment |" in text and "| KV vs moment |" in text and "vs full" not in text
    moment = table[0]
    assert float(moment["speed_vs_reference"]) == 1.0 and float(moment["kv_vs_reference"]) == 1.0
    # Operations are counted against the unpatched model even when it is not timed.
    for row in table:
        layers, total = int(row["layers"]), float(row["ops_per_step"])
        base = float(row["unpatched_ops_per_step"])
        assert layers == 2 and base > 0
        regions = sum(float(row[f"{r}_ops_per_layer"]) for r in ("update", "attention", "observe", "model"))
        assert regions * layers == pytest.approx(total)
        assert float(row["ops_added_per_layer"]) * layers == pytest.approx(total - base)
        assert float(row["update_ops_per_layer"]) > 0
    assert float(moment["observe_ops_per_layer"]) > 0  # 9 new tokens over a budget of 4: the scorers ran
    assert "the unpatched model: " in text


def test_bench_with_the_full_cache_and_the_unpatched_model(model_dir, tmp_path):
    code, table, text = bench(model_dir, tmp_path, "--unpatched", "--policies", "recency.yaml", "full.yaml",
                              "--no-op-counts")
    assert code == 0
    assert [r["policy"] for r in table] == [UNPATCHED, "recency", "full"]
    assert {r["reference"] for r in table} == {"full"}
    assert "| vs full |" in text and "not counted: --no-op-counts" in text
    rows = {r["policy"]: r for r in table}
    assert float(rows["full"]["speed_vs_reference"]) == 1.0
    assert float(rows["full"]["kv_bytes"]) == float(rows[UNPATCHED]["kv_bytes"])  # nothing evicted, same dtype
    assert math.isnan(float(rows[UNPATCHED]["attention_share"]))  # not told apart in transformers' cache
    assert all(math.isnan(float(r["ops_per_step"])) for r in table)


def test_bench_compiled_rows_report_their_compilation_apart(model_dir, tmp_path, monkeypatch):
    import torch._dynamo

    from momentkv.bench import compiled

    monkeypatch.setattr(compiled, "BACKEND", "eager")  # dynamo's graph capture alone: fast, the same graphs
    torch._dynamo.reset()
    code, table, text = bench(model_dir, tmp_path, "--budget", "4", "--lengths", "12", "--policies", "moment.yaml",
                              "--compiled", "moment.yaml", "--no-op-counts")
    torch._dynamo.reset()
    assert code == 0
    rows = {r["policy"]: r for r in table}
    assert list(rows) == ["moment", "moment+compiled"]
    row = rows["moment+compiled"]
    assert 0 < float(row["compile_s"]) <= float(row["compile_wall_s"])
    assert float(row["graphs"]) == 2  # the warm-up compiled the steady step; the timed run compiled nothing
    assert float(row["kv_bytes"]) == float(rows["moment"]["kv_bytes"])
    assert math.isnan(float(row["attention_share"]))  # not instrumented: wrappers would enter the graph
    assert math.isnan(float(rows["moment"]["compile_s"]))
    assert "moment+compiled: " in text and "2 graphs compiled" in text


def test_bench_refuses_a_compiled_policy_without_fixed_shapes(model_dir, tmp_path, capsys):
    code, _, _ = bench(model_dir, tmp_path, "--policies", "recency.yaml", "--compiled", "full.yaml")
    assert code == 2
    assert "a compiled decode step needs every layer to reach a fixed shape" in capsys.readouterr().err


def test_bench_refuses_two_policies_with_one_name(capsys, tmp_path):
    assert main(["bench", "--policies", "moment.yaml", "moment", "--out", str(tmp_path)]) == 2
    assert "'moment' would be ambiguous" in capsys.readouterr().err


def test_reference_is_full_then_unpatched_then_the_first():
    assert report.pick_reference(["moment", "full", UNPATCHED]) == "full"
    assert report.pick_reference(["moment", UNPATCHED]) == UNPATCHED
    assert report.pick_reference(["recency", "moment"]) == "recency"


def test_full_cache_adds_no_tensor_operations_to_an_unpadded_row():
    """With no budget and no padding to track, the patched model issues the unpatched model's operations at
    every decode step after the first (where the layers close the prompt once)."""
    from momentkv.bench.runner import _prepared

    model, inputs = tiny_model("qwen3"), prompts(batch=1, length=5)
    steps = {}
    for policy in (UNPATCHED, "full.yaml"):
        with torch.no_grad(), _prepared(model, policy) as (_, cache), op_count.counting(model, cache) as counts:
            model.generate(**inputs, cache=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        steps[policy] = [sum(step.values()) for step in counts.steps]
        assert len(steps[policy]) == 8 and steps[policy][2] > 0
    assert steps["full.yaml"][2:] == steps[UNPATCHED][2:]


def test_operation_counts_by_region_add_up_and_show_the_scoring():
    model, inputs = tiny_model("qwen3"), prompts(batch=2, length=5)
    unpatched, scoring = op_count_of(model, inputs, UNPATCHED), op_count_of(model, inputs, SCORING)
    assert scoring["total"] > unpatched["total"]
    regions = scoring["update"] + scoring["attention"] + scoring["observe"] + scoring["model"]
    assert regions == pytest.approx(scoring["total"])
    assert scoring["observe"] > 0 and scoring["attention"] > 0


def op_count_of(model, inputs, policy, new_tokens: int = 10) -> dict:
    from momentkv.bench.runner import count_once

    _, ops, layers = count_once(model, inputs, policy, new_tokens)
    assert layers == model.config.num_hidden_layers
    return ops


class Sequence(Regions):
    """Records the regions a run passes through."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def close(self, region):
        self.seen.append(region)


def test_the_attention_function_runs_inside_the_attention_span(monkeypatch):
    """The span from ``update`` returning to ``observe`` being called holds the attention function's work."""
    regions = Sequence()
    inside = []
    original = attention_module.attend
    monkeypatch.setattr(attention_module, "attend",
                        lambda *a, **kw: inside.append(regions.current) or original(*a, **kw))
    model, inputs = tiny_model("llama"), prompts(batch=1, length=5)
    with momentkv.patched(model, SCORING) as handle, torch.no_grad():
        cache = handle.new_cache()
        watch_layers(cache, regions)
        model.generate(**inputs, cache=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert inside and set(inside) == {ATTENTION}
    spans = [r for r in regions.seen if r != MODEL]
    assert spans[:3] == [UPDATE, ATTENTION, OBSERVE] and len(spans) == 3 * 2 * 8  # per layer, per forward


def test_instrumented_runs_generate_the_same_tokens_and_leave_classes_alone():
    model, inputs = tiny_model("mistral"), prompts(batch=2, length=6)
    update, observe = EvictingLayer.update, EvictingLayer.observe
    with torch.no_grad():
        with momentkv.patched(model, SCORING):
            plain = model.generate(**inputs, max_new_tokens=9, min_new_tokens=9, do_sample=False)
        with momentkv.patched(model, SCORING) as handle:
            cache = handle.new_cache()
            with op_count.counting(model, cache):
                counted = model.generate(**inputs, cache=cache, max_new_tokens=9, min_new_tokens=9, do_sample=False)
    timed = run_once(model, inputs, SCORING, 9)
    assert torch.equal(plain, counted)
    assert EvictingLayer.update is update and EvictingLayer.observe is observe
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert timed.update_s > 0 and timed.attention_s > 0 and timed.observe_s > 0


def test_report_rows_label_every_ratio_with_its_reference():
    def summary(name, seconds, kv):
        from momentkv.bench.runner import RunResult

        return Summary(name, 8, [RunResult(name, 8, seconds, kv, 0, 0, 0.1, 0.1, 0.1)])

    table = report.rows([summary("moment", 2.0, 100), summary("recency", 1.0, 50)], reference="moment")
    assert [(r["reference"], r["speed_vs_reference"], r["kv_vs_reference"]) for r in table] == [
        ("moment", 1.0, 1.0), ("moment", 2.0, 0.5)]
    text = report.markdown_table(table)
    assert "| vs moment |" in text and "| KV vs moment |" in text


def test_the_engine_carries_no_instrumentation():
    engine = Path(momentkv.__file__).parent / "engine"
    for source in engine.glob("*.py"):
        text = source.read_text()
        assert "momentkv.bench" not in text and "timer" not in text, source.name


def test_bench_refuses_an_out_folder_holding_other_files_before_any_run(tmp_path, monkeypatch, capsys):
    from momentkv import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    (tmp_path / "thesis.tex").write_text("mine")
    assert main(["bench", "--out", str(tmp_path), "--policies", "moment.yaml"]) == 2
    assert "already holds files that momentkv bench did not write (thesis.tex)" in capsys.readouterr().err
    (tmp_path / "thesis.tex").unlink()
    (tmp_path / "taken").write_text("x")
    assert main(["bench", "--out", str(tmp_path / "taken"), "--attention-heavy"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_bench_reruns_into_its_own_folder_and_keeps_other_files(model_dir, tmp_path):
    assert bench(model_dir, tmp_path, "--budget", "4", "--policies", "moment.yaml", "--no-op-counts")[0] == 0
    (tmp_path / "notes.md").write_text("mine")
    code, table, _ = bench(model_dir, tmp_path, "--budget", "4", "--policies", "recency.yaml", "--no-op-counts")
    assert code == 0 and [r["policy"] for r in table] == ["recency"]
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_attention_heavy_times_a_compiled_step(monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from momentkv.bench import attention_heavy, compiled

    monkeypatch.setattr(compiled, "BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    rows = attention_heavy.run(contexts=(40,), budget=24, decode_budget=8, steps=2, repeats=1, layers=1,
                               compiled=True)
    assert rows[0]["momentkv_compiled_tokens_per_s"] > 0 and rows[0]["compile_s"] > 0
    assert counters["stats"]["unique_graphs"] == 2  # the manual loop at its budget: compiled twice, then reused
    assert "momentkv compiled tokens/s" in attention_heavy.markdown_table(rows)
    torch._dynamo.reset()
