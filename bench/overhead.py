"""Overhead of the analysis pass (per-layer streamed statistics) against a plain decoder forward.

CPU (default): the bundled SmolLM2-135M on the shared wikitext-2 test text.
    python bench/overhead.py                     # timing + peak RSS at 8k vs 64k tokens
    python bench/overhead.py --skip-rss          # timing only
GPU: a Llama-2-7B-shaped random-init model (bf16, built from a config, no weights), 8 x 2048
random tokens.
    python bench/overhead.py --device cuda
    python bench/overhead.py --device cpu --tiny # the same code path on a tiny config (dry run)

Both compare, on the same tokens and batch size, `model.base_model(input_ids, use_cache=False)`
(no LM head) against `collect_layer_stats` (hooks on every decoder layer); warm-up first, then
the two interleaved `--repeats` times, medians reported. Prints tables and writes
bench/results/overhead_<device>.json (and --json PATH if given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout without installing the package

WIKITEXT = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
RESULTS = ROOT / "bench" / "results"
TIME_TARGET = 1.2
RSS_TARGET = 1.1


# --- shared -------------------------------------------------------------------------------------


def load_note() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unavailable"


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(); CUDA events for the wall time on a GPU.

    The CPU seconds (all threads) are less sensitive to other processes sharing the cores.
    """
    import torch

    cpu0 = time.process_time()
    if torch.device(device).type == "cuda":
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, time.process_time() - cpu0
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin, time.process_time() - cpu0


def plain_pass(model, windows, batch_size: int) -> None:
    import torch

    from linearize.capture import iterate_batches, run_decoder

    with torch.no_grad():
        for _, batch in iterate_batches(windows, batch_size):
            run_decoder(model, batch)


def analysis_pass(model, windows, batch_size: int, *, accumulate_dtype=None, reservoir: int = 0):
    from linearize.architectures import decoder_layers
    from linearize.capture import collect_layer_stats

    return collect_layer_stats(
        model,
        decoder_layers(model),
        windows,
        batch_size=batch_size,
        reservoir_size=reservoir,
        accumulate_dtype=accumulate_dtype,
    )


def compare(model, windows, batch_size: int, variants: dict, repeats: int, device) -> dict:
    """Median seconds of the plain pass and of each analysis variant, interleaved, after warm-up."""
    runs = {"plain forward": lambda: plain_pass(model, windows, batch_size)}
    for name, kwargs in variants.items():
        runs[name] = lambda kwargs=kwargs: analysis_pass(model, windows, batch_size, **kwargs)
    warm = windows[:batch_size]
    plain_pass(model, warm, batch_size)
    for kwargs in variants.values():
        analysis_pass(model, warm, batch_size, **kwargs)
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, used = timed(fn, device)
            samples[name].append(wall)
            cpu[name].append(used)
    base = statistics.median(samples["plain forward"])
    base_cpu = statistics.median(cpu["plain forward"])
    rows = {}
    for name, values in samples.items():
        median = statistics.median(values)
        rows[name] = {
            "median_s": median,
            "min_s": min(values),
            "samples_s": values,
            "ratio_median": median / base,
            "ratio_min": min(values) / min(samples["plain forward"]),
            "cpu_median_s": statistics.median(cpu[name]),
            "cpu_samples_s": cpu[name],
            "ratio_cpu": statistics.median(cpu[name]) / base_cpu,
        }
    return rows


def print_time_table(title: str, rows: dict, tokens: int) -> None:
    print(f"\n{title}")
    print(
        f"{'pass':<40} {'median s':>9} {'min s':>8} {'tok/s':>8} {'x plain':>8} {'x (min)':>8} "
        f"{'x (CPU s)':>9}"
    )
    for name, row in rows.items():
        print(
            f"{name:<40} {row['median_s']:9.3f} {row['min_s']:8.3f} "
            f"{tokens / row['median_s']:8.0f} {row['ratio_median']:8.3f} {row['ratio_min']:8.3f} "
            f"{row['ratio_cpu']:9.3f}"
        )


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


def write_json(result: dict, name: str, extra_path: str | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS / name] + ([Path(extra_path)] if extra_path else [])
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {path}")


def environment() -> dict:
    import machine  # bench/machine.py, beside this script
    import torch
    import transformers

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (3.10)
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu": machine.cpu_model(),
        "cpus": os.cpu_count(),
        "load_before": load_note(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


# --- CPU: bundled model, wikitext, peak RSS ------------------------------------------------------


def cpu_windows(tokenizer, tokens: int, seq_len: int):
    from linearize.data import read_text, tokenize_windows

    text = read_text(WIKITEXT).text
    return tokenize_windows(tokenizer, text, tokens, seq_len, "calib")


def load_bundled():
    from linearize.loading import load_model

    begin = time.perf_counter()
    loaded = load_model("smollm2-135m")
    print(f"loaded smollm2-135m in {time.perf_counter() - begin:.1f}s", flush=True)
    return loaded.model, loaded.tokenizer


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def rss_child(tokens: int, seq_len: int, batch_size: int, reservoir: int) -> None:
    """One analysis pass in this process; prints a JSON line with its peak RSS."""
    import resource

    model, tokenizer = load_bundled()
    windows = cpu_windows(tokenizer, tokens, seq_len)
    rss_before = _status_kb("VmRSS")
    try:  # reset VmHWM so that the peak below is the pass's, not the model load's
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    begin = time.perf_counter()
    analysis_pass(model, windows, batch_size, reservoir=reservoir)
    seconds = time.perf_counter() - begin
    record = {
        "tokens": windows.numel(),
        "seconds": seconds,
        "rss_before_pass_mb": rss_before / 1024,
        "peak_during_pass_mb": _status_kb("VmHWM") / 1024 if hwm_reset else None,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RSS_RESULT " + json.dumps(record), flush=True)


def measure_rss(token_counts, seq_len: int, batch_size: int, reservoir: int) -> dict:
    out = {}
    for tokens in token_counts:
        cmd = [sys.executable, __file__, "--rss-child", str(tokens), "--seq-len", str(seq_len)]
        cmd += ["--batch-size", str(batch_size), "--reservoir", str(reservoir)]
        print(f"\n$ {' '.join(cmd[1:])}   ({load_note()})", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RSS_RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            raise SystemExit(f"RSS child for {tokens} tokens failed (exit {proc.returncode})")
        out[tokens] = json.loads(lines[-1].removeprefix("RSS_RESULT "))
        out[tokens]["load_after"] = load_note()
        print(out[tokens], flush=True)
    return out


def run_cpu(args) -> dict:
    import torch

    model, tokenizer = load_bundled()
    windows = cpu_windows(tokenizer, args.tokens, args.seq_len)
    tokens = windows.numel()
    variants = {"analysis pass": {}}
    if args.reservoir:
        variants[f"analysis pass + reservoir {args.reservoir}"] = {"reservoir": args.reservoir}
    print(
        f"\nCPU timing: {tokens} tokens = {len(windows)} x {args.seq_len}, batch {args.batch_size}, "
        f"dtype {next(model.parameters()).dtype}, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats ({load_note()})",
        flush=True,
    )
    rows = compare(model, windows, args.batch_size, variants, args.repeats, "cpu")
    load_after = load_note()
    title = f"smollm2-135m, {tokens} tokens, CPU ({load_after})"
    print_time_table(title, rows, tokens)
    ratio = rows["analysis pass"]["ratio_median"]
    print(f"time overhead {ratio:.3f}x (target <= {TIME_TARGET}x): {verdict(ratio, TIME_TARGET)}")
    result = {
        "device": "cpu",
        "model": "smollm2-135m",
        "tokens": tokens,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "timing": rows,
        "time_ratio": ratio,
        "time_target": TIME_TARGET,
        "time_target_met": ratio <= TIME_TARGET,
        "load_after_timing": load_after,
    }
    del model
    if not args.skip_rss:
        rss = measure_rss(args.rss_tokens, args.seq_len, args.batch_size, args.rss_reservoir)
        small, large = (rss[t] for t in args.rss_tokens)
        key = "peak_during_pass_mb" if small["peak_during_pass_mb"] else "ru_maxrss_mb"
        rss_ratio = large[key] / small[key]
        print(f"\npeak RSS of the analysis pass (reservoir {args.rss_reservoir})")
        print(f"{'tokens':>8} {'pass peak MB':>13} {'process peak MB':>16} {'pass s':>8}")
        for t in args.rss_tokens:
            r = rss[t]
            print(
                f"{t:>8} {r['peak_during_pass_mb'] or float('nan'):13.1f} "
                f"{r['ru_maxrss_mb']:16.1f} {r['seconds']:8.1f}"
            )
        print(
            f"RSS {args.rss_tokens[1]} / {args.rss_tokens[0]} tokens ({key}): {rss_ratio:.3f}x "
            f"(target <= {RSS_TARGET}x): {verdict(rss_ratio, RSS_TARGET)}"
        )
        result.update(
            rss=rss, rss_metric=key, rss_ratio=rss_ratio, rss_target_met=rss_ratio <= RSS_TARGET
        )
    return result


# --- GPU: Llama-2-7B-shaped random-init model ----------------------------------------------------


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        shape = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4)
        shape.update(num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
    else:  # Llama-2-7B
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
        shape.update(num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    return LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)


def build_random_llama(config, device, dtype):
    """Random init directly on the device in the target dtype (no fp32 copy, no CPU init)."""
    import torch
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def precision_check(model, windows, batch_size: int, layer_indices, accumulate_dtype):
    """Streamed stats of the fast path against fp64 on the very same activations of a few layers."""
    import torch

    from linearize.architectures import decoder_layers
    from linearize.capture import PairStats, hooked, layer_io
    from linearize.linearity import explained_fraction

    layers = decoder_layers(model)
    d = model.config.hidden_size
    fast = {i: PairStats(d, d, accumulate_dtype=accumulate_dtype) for i in layer_indices}
    exact = {i: PairStats(d, d, accumulate_dtype=torch.float64) for i in layer_indices}
    kept = {}

    def on_layer(index, args, kwargs, output):
        x, y = layer_io(args, kwargs, output)
        fast[index].update(x, y)
        exact[index].update(x.double(), y.double())  # fp64 rows: extras in fp64 too
        if index == layer_indices[-1] and not kept:
            kept["x"], kept["y"] = x.detach().clone(), y.detach().clone()

    with hooked({i: layers[i] for i in layer_indices}, on_layer):
        plain_pass(model, windows, batch_size)
    rows = []
    device = next(model.parameters()).device
    for i in layer_indices:
        a, b = fast[i].centered(), exact[i].centered()

        def rel(u, v):
            return float((u - v).norm() / v.norm())

        scores = [
            1 - explained_fraction(s.gram.to(device), s.cross.to(device), s.y_sq) for s in (a, b)
        ]
        rows.append(
            {
                "layer": i,
                "gram_rel_err": rel(a.gram, b.gram),
                "cross_rel_err": rel(a.cross, b.cross),
                "y_sq_rel_err": abs(a.y_sq - b.y_sq) / b.y_sq,
                "one_minus_score_fp64": scores[1],
                "one_minus_score_rel_err": abs(scores[0] - scores[1]) / max(abs(scores[1]), 1e-300),
                "relative_update_norm_rel_err": abs(
                    fast[i].sq_update / fast[i].sq_input - exact[i].sq_update / exact[i].sq_input
                )
                / (exact[i].sq_update / exact[i].sq_input),
                "cos_mean_abs_err": abs(fast[i].cos_sum - exact[i].cos_sum) / fast[i].n,
            }
        )
    return rows, kept


def sync_free_check(device, dtype, d: int) -> str:
    """PairStats.update under CUDA's sync debug mode "error": passes only if nothing syncs."""
    import torch

    from linearize.capture import PairStats

    if device.type != "cuda":
        return "skipped (not CUDA)"
    x = torch.randn(512, d, device=device, dtype=dtype)
    stats = PairStats(d, d, accumulate_dtype=dtype)
    stats.update(x, x)  # first call allocates; the steady state is what runs per layer
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats.update(x, x * 1.5)
        result = "ok: no host-device sync in PairStats.update"
    except RuntimeError as error:
        result = f"FAILED: {error}".splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return result


def profile_update(x, y, device, acc, repeats: int = 10) -> dict:
    """Milliseconds per call of one layer's PairStats.update and of its parts, on real rows."""
    import torch

    from linearize.capture import PairStats, gram_fp32, paired_sums

    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    d = x.shape[1]
    stats = PairStats(d, d, accumulate_dtype=acc)
    stats.update(x, y)
    xs, ys = x.to(acc), y.to(acc)
    mm = gram_fp32 if stats.raw_rows else (lambda a, b: a.T @ b)
    parts = {
        "PairStats.update (all)": lambda: stats.update(x, y),
        "block Grams X^T X (10/16) + X^T Y": lambda: stats._add_grams(xs, ys, mm),
        "two full GEMMs X^T X, X^T Y": lambda: (mm(xs, xs), mm(xs, ys)),
        "paired extras (3 row norms)": lambda: paired_sums(x, y),
        "column sums + yy_diag (fp64)": lambda: (
            xs.sum(0, dtype=torch.float64),
            ys.sum(0, dtype=torch.float64),
            torch.linalg.vector_norm(ys, dim=0, dtype=torch.float64),
        ),
    }
    out = {}
    for name, fn in parts.items():
        fn()
        samples = [timed(fn, device)[0] * 1000 for _ in range(repeats)]
        out[name] = statistics.median(samples)
    return out


def run_gpu(args) -> dict:
    import torch

    from linearize.capture import _mm_out_dtype_works, accumulation_dtype

    device = torch.device(args.device if args.device != "cuda" else "cuda:0")
    dtype = torch.bfloat16
    config = llama_config(args.tiny)
    begin = time.perf_counter()
    torch.manual_seed(0)
    model = build_random_llama(config, device, dtype)
    synchronize(device)
    built = time.perf_counter() - begin
    params = sum(p.numel() for p in model.parameters())
    batch, seq = (2, 128) if args.tiny else (8, 2048)
    windows = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    tokens = windows.numel()
    acc = accumulation_dtype(dtype, device)
    print(
        f"\nrandom-init Llama ({'tiny' if args.tiny else '7B'} shape): {params / 1e9:.2f}B params, "
        f"{config.num_hidden_layers} layers, d={config.hidden_size}, {dtype}, on {device}; "
        f"built in {built:.1f}s; tokens {batch} x {seq}, batch {batch}; fast path "
        f"accumulate_dtype={acc}, torch.mm(out_dtype=fp32) available: "
        f"{_mm_out_dtype_works(device)}",
        flush=True,
    )
    variants = {f"analysis pass ({str(acc).removeprefix('torch.')}, default)": {}}
    if not args.no_legacy:
        variants["analysis pass (fp32 shifted, old path)"] = {"accumulate_dtype": torch.float32}
    if args.reservoir:
        variants[f"analysis pass + reservoir {args.reservoir}"] = {"reservoir": args.reservoir}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = compare(model, windows, batch, variants, args.repeats, device)
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    name = str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)
    shape = "tiny" if args.tiny else "Llama-2-7B-shaped"
    print_time_table(f"{shape} random-init bf16, {tokens} tokens, {name}", rows, tokens)
    headline = next(iter(variants))
    ratio = rows[headline]["ratio_median"]
    print(f"time overhead {ratio:.3f}x (target <= {TIME_TARGET}x): {verdict(ratio, TIME_TARGET)}")
    if peak_gb is not None:
        print(f"peak GPU memory allocated over the timed passes: {peak_gb:.1f} GiB")
    last = config.num_hidden_layers - 1
    check, kept = precision_check(model, windows, batch, sorted({0, last // 2, last}), acc)
    print("\nprecision of the fast path against fp64 stats of the same activations (rel. errors)")
    print(
        f"{'layer':>5} {'gram':>9} {'cross':>9} {'y_sq':>9} {'1-score':>11} {'rel err':>9} "
        f"{'upd.norm':>9} {'cos abs':>9}"
    )
    for r in check:
        print(
            f"{r['layer']:>5} {r['gram_rel_err']:9.1e} {r['cross_rel_err']:9.1e} "
            f"{r['y_sq_rel_err']:9.1e} {r['one_minus_score_fp64']:11.3e} "
            f"{r['one_minus_score_rel_err']:9.1e} {r['relative_update_norm_rel_err']:9.1e} "
            f"{r['cos_mean_abs_err']:9.1e}"
        )
    print("(rel err of 1-score is only meaningful where 1-score >> 1e-7)")
    parts = profile_update(kept["x"], kept["y"], device, acc)
    print(f"\none layer's statistics on {tokens} real rows, ms per call (median)")
    for name, ms in parts.items():
        print(f"  {name:<36} {ms:9.3f}")
    layers_ms = rows["plain forward"]["median_s"] * 1000 / config.num_hidden_layers
    print(f"  {'(plain forward per layer)':<36} {layers_ms:9.3f}")
    sync = sync_free_check(device, dtype, config.hidden_size)
    print(f"\nsync check: {sync}")
    return {
        "device": name,
        "model": f"random-init Llama ({'tiny' if args.tiny else '7B'} shape)",
        "params": params,
        "dtype": str(dtype),
        "accumulate_dtype": str(acc),
        "mm_out_dtype": _mm_out_dtype_works(device),
        "tokens": tokens,
        "batch": batch,
        "seq_len": seq,
        "build_s": built,
        "timing": rows,
        "time_ratio": ratio,
        "time_target": TIME_TARGET,
        "time_target_met": ratio <= TIME_TARGET,
        "peak_gpu_gib": peak_gb,
        "precision": check,
        "update_profile_ms": parts,
        "sync_check": sync,
        "anchor_h200": {"fp64 Grams": 2.41, "bf16 inputs, fp32 accumulation": 1.45},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (bundled model) or cuda (7B shape)")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama (GPU code path)")
    parser.add_argument("--tokens", type=int, default=4096, help="CPU timing tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reservoir", type=int, default=0, help="also time with a reservoir")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-tokens", type=int, nargs=2, default=[8192, 65536])
    parser.add_argument("--rss-reservoir", type=int, default=2048, help="as in the pipeline")
    parser.add_argument("--no-legacy", action="store_true", help="GPU: skip the old fp32 path")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU timing)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.seq_len, args.batch_size, args.reservoir)
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    env = environment()
    print(json.dumps(env))
    gpu_path = args.device.startswith("cuda") or args.tiny
    result = run_gpu(args) if gpu_path else run_cpu(args)
    result["environment"] = env
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    suffix = "cuda" if args.device.startswith("cuda") else ("tiny" if args.tiny else "cpu")
    suffix += f"_{args.threads}thread" if args.threads else ""
    write_json(result, f"overhead_{suffix}.json", args.json)


if __name__ == "__main__":
    main()
