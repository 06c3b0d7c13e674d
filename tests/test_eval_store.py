"""Saved evaluations: a rerun loads the reference and unchanged passes; a changed policy is recomputed; passes of a
peer toolkit, with numbers or with an error, merge into one report."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from momentkv.cli.main import main
from momentkv.eval import passfile
from momentkv.eval.configs import build_configs
from momentkv.eval.prompts import PromptRecord
from momentkv.eval.runner import run_eval
from momentkv.eval.store import SavedEvaluation, load_saved
from tests.models import tiny_model

STEPS = 12


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(3)
    encoded = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (6, 9)]
    records = [PromptRecord(id="a", prompt="x", kind="free"), PromptRecord(id="b", prompt="x", kind="grounded")]
    return tiny_model(layers=2), encoded, records


def _run(setup, root, sources, budgets=(4,), lines=None):
    model, encoded, records = setup
    store = SavedEvaluation.under(root, "tiny", STEPS, None, records, encoded, [2], 2)
    out = run_eval(model, encoded, records, build_configs(list(sources), list(budgets)), STEPS, [2], 0,
                   batch_size=2, progress=False, free_run=False, store=store,
                   log=None if lines is None else lines.append)
    return store, out


def test_rerun_loads_unchanged_passes_and_recomputes_changed_ones(setup, tmp_path):
    store, first = _run(setup, tmp_path, ["full.yaml", "recency.yaml"])
    assert sorted(p.name for p in passfile.list_passes(store.folder)) == ["full.pt", "recency@4.pt"]
    lines = []
    _, again = _run(setup, tmp_path, ["full.yaml", "recency.yaml"], lines=lines)
    assert all("loaded from the store" in line for line in lines) and len(lines) == 2
    assert torch.equal(first.results[1].metrics.kl, again.results[1].metrics.kl)
    assert torch.equal(first.reference_tokens, again.reference_tokens)
    # The same label with another policy is not taken from the store.
    changed = {"name": "recency", "decode": {"budget": 4, "sinks": 1, "scorers": [{"type": "recency"}]}}
    lines = []
    _, third = _run(setup, tmp_path, ["full.yaml", changed], budgets=(4,), lines=lines)
    assert "loaded from the store" not in lines[1]
    assert not torch.equal(first.results[1].metrics.kl, third.results[1].metrics.kl)


def test_another_prompt_set_gets_another_reference_folder(setup, tmp_path):
    _, encoded, records = setup
    a = SavedEvaluation.under(tmp_path, "tiny", STEPS, None, records, encoded, [2], 2)
    b = SavedEvaluation.under(tmp_path, "tiny", STEPS, None, records[:1], encoded[:1], [2], 2)
    c = SavedEvaluation.under(tmp_path, "tiny", STEPS + 1, None, records, encoded, [2], 2)
    assert len({a.folder, b.folder, c.folder}) == 3


def test_report_merges_peer_passes_and_lists_failures(setup, tmp_path, capsys):
    store, out = _run(setup, tmp_path, ["full.yaml", "recency.yaml"])
    kl = torch.full((2, STEPS), 0.25, dtype=torch.float64)
    common = {"budget": 20, "memory": "total", "source": "peer", "fingerprint": None, "policy": None,
              "device": "cpu", "kv_bytes": 0, "stored": 0, "free_tokens": None, "generated_slots": None,
              "notes": None}
    passfile.write_pass(store.folder, {**common, "label": "peer-method@T20", "name": "peer-method",
                                       "seconds": 1.0, "kl": kl, "agree": torch.ones(2, STEPS, dtype=torch.bool),
                                       "nll": kl, "active_from": torch.tensor([3, 3]),
                                       "slots": torch.tensor([20.0, 20.0]), "error": None})
    passfile.write_pass(store.folder, {**common, "label": "peer-broken@T20", "name": "peer-broken", "seconds": 0.5,
                                       "kl": None, "agree": None, "nll": None, "active_from": None, "slots": None,
                                       "error": "FloatingPointError: non-finite logits at step 4"})
    results, failures = load_saved(store.folder)
    assert [r.config.label for r in results.results] == ["full", "recency@4", "peer-method@T20"]
    assert failures == [{"label": "peer-broken@T20", "source": "peer",
                         "error": "FloatingPointError: non-finite logits at step 4"}]
    assert torch.equal(results.results[1].metrics.kl, out.results[1].metrics.kl)
    report = tmp_path / "report"
    assert main(["report", str(store.folder), "--out", str(report)]) == 0
    text = (report / "results.md").read_text()
    assert "| peer-method | T 20 | 0.250 [0.250, 0.250] |" in text
    assert "| peer-broken@T20 | peer | FloatingPointError: non-finite logits at step 4 |" in text
    # Against another baseline the paired column names it, and the command printed is the one that was run.
    assert main(["report", str(store.folder), "--out", str(report), "--baseline", "peer-method"]) == 0
    text = (report / "results.md").read_text()
    assert "KL vs peer-method (active)" in text
    assert f"momentkv report {store.folder} --out {report} --baseline peer-method" in text
    # The leaderboard page's summary table is read from this file: the peer's row and the paired column survive.
    doc_table = _load_by_path(Path(__file__).resolve().parent.parent / "benchmarks" / "leaderboard" / "doc_table.py")
    capsys.readouterr()
    assert doc_table.main([str(report / "results.md"), "--order", "peer-method"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| policy | budget | KL, all 2 | top-1 | vs peer-method, all |")
    rows = [line.split(" | ")[0].lstrip("| ") for line in table[2:]]
    assert rows == ["recency", "peer-method"]  # decode budgets before totals (4, then T 20)
    assert table[3].startswith("| peer-method | T 20 | 0.250 [0.250, 0.250] | 1.000 | — |")
    assert doc_table.main([str(report / "results.md"), "--budgets", "T 20"]) == 0
    assert [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()[2:]] == ["| peer-method"]
    (report / "other.md").write_text("## all prompts\n\n| policy | budget |\n| --- | --- |\n| a | 4 |\n")
    assert doc_table.main([str(report / "other.md")]) == 2
    assert "no 'KL vs ... (active)' column" in capsys.readouterr().err


def test_report_of_a_folder_without_reference_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no finished reference" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["passfile.py", "metrics.py"])
def test_files_a_peer_runner_loads_by_path_import_no_momentkv(name):
    # benchmarks/peers/kvpress/run.py runs where momentkv cannot be imported (an older transformers).
    path = Path(__file__).resolve().parent.parent / "momentkv" / "eval" / name
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "json", "os", "re", "pathlib", "numpy", "torch"}


def test_pareto_front_keeps_only_undominated_points():
    from momentkv.eval.report import pareto_front

    points = [("fast-rough", 20.0, 0.5), ("slow-exact", 10.0, 0.1), ("dominated", 9.0, 0.6), ("middle", 15.0, 0.2)]
    assert pareto_front(points) == ["fast-rough", "slow-exact", "middle"]


def test_report_with_bench_speeds_plots_fidelity_against_speed(setup, tmp_path, capsys):
    store, _ = _run(setup, tmp_path, ["full.yaml", "recency.yaml", "moment.yaml"])
    bench = tmp_path / "bench.csv"
    bench.write_text("policy,new_tokens,tokens_per_s\nfull,12,10.0\nrecency,12,12.0\nmoment,12,11.0\n")
    report = tmp_path / "report"
    assert main(["report", str(store.folder), "--out", str(report), "--bench", str(bench), "--bench-budget", "4"]) == 0
    assert (report / "fidelity_vs_speed_B4.png").is_file()
    assert "## Fidelity against speed at decode budget 4" in (report / "results.md").read_text()
    assert main(["report", str(store.folder), "--out", str(report), "--bench", str(bench)]) == 2
    assert "--bench and --bench-budget go together" in capsys.readouterr().err


def _load_by_path(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _window_means(metrics, start: int, stop: int) -> list[float | None]:
    """Each prompt's mean KL over the steps in [start, stop) at or after its first eviction (None if none)."""
    kl = metrics.kl.double()
    means = []
    for p in range(kl.shape[0]):
        steps = [s for s in range(start, stop) if s >= int(metrics.active_from[p])]
        means.append(float(kl[p, steps].mean()) if steps else None)
    return means


def test_windows_split_each_pass_into_step_windows(setup, tmp_path, capsys):
    store, out = _run(setup, tmp_path, ["full.yaml", "recency.yaml", "moment.yaml"])
    windows = _load_by_path(Path(__file__).resolve().parent.parent / "benchmarks" / "leaderboard" / "windows.py")
    recency, moment = out.results[1].metrics, out.results[2].metrics
    for window, bounds in [(5, [(0, 5), (5, 10), (10, 12)]), (3, [(0, 3), (3, 6), (6, 9), (9, 12)])]:
        assert windows.main([str(store.folder), "--budget", "4", "--window", str(window),
                             "--policies", "recency", "moment"]) == 0
        rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
        assert [(r[0].lstrip("| "), r[1]) for r in rows] == [
            (name, f"{start}–{stop - 1}") for start, stop in bounds for name in ("recency", "moment")]
        for (start, stop), (base_row, row) in zip(bounds, zip(rows[::2], rows[1::2])):
            base, mine = _window_means(recency, start, stop), _window_means(moment, start, stop)
            for cells, means in [(base_row, base), (row, mine)]:
                values = [m for m in means if m is not None]
                assert cells[2].startswith(f"{sum(values) / len(values):.3f} [") if values else cells[2] == "—"
            assert base_row[3].strip(" |") == "—"  # the baseline against itself
            # The paired change: mean over prompts with both means, moment's over recency's, minus one.
            pairs = [(a, b) for a, b in zip(mine, base) if a is not None and b is not None]
            if pairs and sum(b for _, b in pairs) > 0:
                change = 100 * (sum(a for a, _ in pairs) / sum(b for _, b in pairs) - 1)
                assert row[3].startswith(f"{change:+.1f}% [")
            else:
                assert row[3].strip(" |") == "—"
        if window == 3:  # budget 4: nothing is evicted before step 4, so the first window has no KL to show
            assert rows[0][2] == "—" and rows[1][3].strip(" |") == "—"
    assert windows.main([str(store.folder), "--budget", "4", "--policies", "tova"]) == 2
    assert "no pass of ['tova'] at decode budget 4" in capsys.readouterr().err
    assert windows.main([str(store.folder.parent), "--budget", "4"]) == 2
    assert "holds no finished reference" in capsys.readouterr().err
