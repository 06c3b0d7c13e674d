"""GPU benchmark of the fused decode-attention kernel: one layer shaped like an 8B model, cache lengths 4k-128k.

    python benchmarks/gpu_kernels.py [--out benchmarks/results/gpu_kernels.csv] [--lengths 4096 8192 ...]

For each cache length it times, with ``triton.testing.do_bench`` (median, milliseconds):

* ``sdpa``: ``F.scaled_dot_product_attention`` alone (query (1, 32, 1, 128), K/V (1, 8, L, 128), enable_gqa);
* ``sdpa_scoring``: SDPA plus the engine's separate scoring (``group_attention``: a second pass over K for the
  logits, softmax and the mean over each GQA group);
* ``torch_single``: the engine's torch single pass (``attend`` plus the group mean: one pass for output and
  scores, what a decode step runs where the kernel does not apply);
* ``fused``: ``fused_decode_attention`` (output and group-averaged attention in one kernel pass);
* ``fused_masked``: the same with a ``valid`` mask;
* ``*_graph``: SDPA and the fused kernel replayed from a CUDA graph, without CPU launch overhead;

checks the kernel against the torch reference (max abs error of output and attention), prints a table of
ratios and writes a CSV. A small sweep of tile size and warps at the longest lengths goes to a second
CSV. An error at one length is printed and the run goes on. Needs CUDA, torch and triton; no network.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072]


def import_kernels():
    """``momentkv.kernels`` and the engine's grouped attention, even where the rest of momentkv's dependencies
    (transformers) are not installed: both need only torch (and triton for the kernel)."""
    try:
        import momentkv.kernels as kernels
    except Exception as error:  # e.g. transformers missing: load the two torch-only modules alone
        print(f"note: `import momentkv` failed ({error}); loading momentkv.kernels by itself")
        for name in [n for n in sys.modules if n == "momentkv" or n.startswith("momentkv.")]:
            del sys.modules[name]
        for name, folder in (("momentkv", ROOT / "momentkv"), ("momentkv.engine", ROOT / "momentkv" / "engine")):
            package = types.ModuleType(name)  # a bare package: its __init__ (which imports transformers) skipped
            package.__path__ = [str(folder)]
            sys.modules[name] = package
        import momentkv.kernels as kernels
    from momentkv.core import group_attention
    from momentkv.kernels import triton_decode

    return kernels, triton_decode, group_attention


def median_ms(fn, graph=False) -> float:
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def inputs(length, seed=0):
    """Query ``(1, 32, 128)``, K/V ``(1, 8, L, 128)`` bf16 and a mask ``(1, L)`` with 10% of the keys out."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    valid = torch.rand(1, length, device="cuda", generator=g) > 0.1
    valid[:, -1] = True
    return q, k, v, valid


def measure(length, kernels, triton_decode, group_attention) -> dict:
    q, k, v, valid = inputs(length)
    scaling = HEAD_DIM**-0.5
    q4 = q.unsqueeze(2)  # (1, 32, 1, 128) as the model passes it

    out, attn = kernels.fused_decode_attention(q, k, v, scaling, valid)  # correctness first
    want_out, want_attn = kernels.decode_attention_reference(q, k, v, scaling, valid)
    torch.cuda.synchronize()
    row = {
        "length": length,
        "err_out": (out.float() - want_out.float()).abs().max().item(),
        "err_attn": (attn - want_attn).abs().max().item(),
        "attn_sum_err": (attn.sum(-1) - 1).abs().max().item(),
    }
    del want_out, want_attn

    sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, scale=scaling, enable_gqa=True)  # noqa: E731

    def sdpa_scoring():  # attention, then the scores in a second pass over K
        F.scaled_dot_product_attention(q4, k, v, scale=scaling, enable_gqa=True)
        group_attention.group_attention(q4, k, None, scaling)

    def torch_single():  # the engine's torch single pass: output and scores from one softmax
        _, probs = group_attention.attend(q4, k, v, None, scaling)
        group_attention.group_mean(probs[:, :, :, -1])

    fused = lambda: kernels.fused_decode_attention(q, k, v, scaling)  # noqa: E731
    fused_masked = lambda: kernels.fused_decode_attention(q, k, v, scaling, valid)  # noqa: E731

    row["sdpa_ms"] = median_ms(sdpa)
    row["sdpa_scoring_ms"] = median_ms(sdpa_scoring)
    row["torch_single_ms"] = median_ms(torch_single)
    row["fused_ms"] = median_ms(fused)
    row["fused_masked_ms"] = median_ms(fused_masked)
    for name, fn in (("sdpa_graph_ms", sdpa), ("fused_graph_ms", fused)):
        try:
            row[name] = median_ms(fn, graph=True)
        except Exception as error:  # capture can fail on some stacks; the eager numbers still stand
            print(f"  {name} at {length}: {type(error).__name__}: {error}")
            row[name] = math.nan
    kv_bytes = 2 * k.numel() * k.element_size()
    row["sdpa_GBps"] = kv_bytes / row["sdpa_ms"] / 1e6
    row["fused_GBps"] = kv_bytes / row["fused_ms"] / 1e6
    row["fused_vs_sdpa"] = row["fused_ms"] / row["sdpa_ms"]
    row["fused_vs_sdpa_scoring"] = row["fused_ms"] / row["sdpa_scoring_ms"]
    row["fused_vs_torch_single"] = row["fused_ms"] / row["torch_single_ms"]
    row["graph_fused_vs_sdpa"] = row["fused_graph_ms"] / row["sdpa_graph_ms"]
    return row


def sweep(length, kernels, triton_decode) -> list[dict]:
    """Tile size x split count x pipeline stages for the fused kernel at one length (CUDA-graph timing)."""
    q, k, v, _ = inputs(length)
    scaling = HEAD_DIM**-0.5
    base = triton_decode.split_plan(length, KV_HEADS, q.device, 64)[1]
    rows = []
    split_counts = sorted({max(1, base // 2), base, base * 2})
    configs = [(block_n, 4, splits, stages) for block_n in (64, 128) for splits in split_counts
               for stages in (2, 3, 4)]
    configs += [(32, 4, base, 3), (64, 8, base, 3)]
    for block_n, num_warps, splits, stages in configs:
        fn = lambda: triton_decode.decode_attention_triton(  # noqa: E731
            q, k, v, scaling, None, block_n=block_n, num_splits=splits, num_warps=num_warps, num_stages=stages)
        try:
            ms = median_ms(fn, graph=True)
        except Exception as error:
            print(f"  sweep block_n={block_n} warps={num_warps} splits={splits} stages={stages}: "
                  f"{type(error).__name__}: {error}")
            ms = math.nan
        rows.append({"length": length, "block_n": block_n, "num_warps": num_warps, "num_splits": splits,
                     "num_stages": stages, "fused_graph_ms": ms})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_kernels.csv")
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--sweep-lengths", type=int, nargs="*", default=[32768, 131072])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        return 1
    import triton

    kernels, triton_decode, group_attention = import_kernels()
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"python {sys.version.split()[0]}; layer: {HEADS} query / {KV_HEADS} KV heads, head dim {HEAD_DIM}, bf16, "
          f"batch 1")
    started = time.time()
    rows = []
    for length in args.lengths:
        try:
            row = measure(length, kernels, triton_decode, group_attention)
        except Exception:
            print(f"length {length}: failed")
            traceback.print_exc()
            continue
        rows.append(row)
        print(f"  {length:>6}: sdpa {row['sdpa_ms']:.4f} ms, +scoring {row['sdpa_scoring_ms']:.4f}, "
              f"torch single pass {row['torch_single_ms']:.4f}, fused {row['fused_ms']:.4f}, "
              f"graph sdpa {row['sdpa_graph_ms']:.4f} fused {row['fused_graph_ms']:.4f} "
              f"({time.time() - started:.0f} s)", flush=True)
        torch.cuda.empty_cache()

    header = (f"{'tokens':>7} {'sdpa ms':>9} {'+score ms':>9} {'single ms':>9} {'fused ms':>9} {'masked':>9} "
              f"{'fused/sdpa':>10} {'fused/+sc':>9} {'fused/1p':>9} {'graph f/s':>9} {'GB/s sdpa':>9} "
              f"{'GB/s fused':>10} {'err out':>8} {'err attn':>8}")
    print("\n" + header)
    for r in rows:
        print(f"{r['length']:>7} {r['sdpa_ms']:>9.4f} {r['sdpa_scoring_ms']:>9.4f} {r['torch_single_ms']:>9.4f} "
              f"{r['fused_ms']:>9.4f} {r['fused_masked_ms']:>9.4f} {r['fused_vs_sdpa']:>10.3f} "
              f"{r['fused_vs_sdpa_scoring']:>9.3f} {r['fused_vs_torch_single']:>9.3f} {r['graph_fused_vs_sdpa']:>9.3f} "
              f"{r['sdpa_GBps']:>9.0f} {r['fused_GBps']:>10.0f} {r['err_out']:>8.1e} {r['err_attn']:>8.1e}")
    if rows:
        write_csv(args.out, rows)
        print(f"\nwrote {args.out}")

    sweep_rows = []
    for length in args.sweep_lengths:
        try:
            sweep_rows += sweep(length, kernels, triton_decode)
        except Exception:
            print(f"sweep at {length}: failed")
            traceback.print_exc()
    if sweep_rows:
        path = args.out.with_name(args.out.stem + "_sweep.csv")
        write_csv(path, sweep_rows)
        best = {}
        for r in sweep_rows:
            if not math.isnan(r["fused_graph_ms"]) and (r["length"] not in best or
                                                       r["fused_graph_ms"] < best[r["length"]]["fused_graph_ms"]):
                best[r["length"]] = r
        for length, r in best.items():
            print(f"sweep {length}: best block_n={r['block_n']} warps={r['num_warps']} splits={r['num_splits']} "
                  f"stages={r['num_stages']} {r['fused_graph_ms']:.4f} ms")
        print(f"wrote {path}")
    print(f"total {time.time() - started:.0f} s")
    return 0 if len(rows) == len(args.lengths) else 2


if __name__ == "__main__":
    sys.exit(main())
