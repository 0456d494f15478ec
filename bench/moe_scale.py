"""Streamed compress of a Qwen3-30B-A3B-shaped mixture-of-experts layer stack (CPU, random weights).

The layers have Qwen3-30B-A3B's real shapes (d = 2048, 128 experts of moe_intermediate_size 768,
top-8, 32 query / 4 key-value heads of head_dim 128); only the depth (a few layers) and the
vocabulary (the tests' 260-token byte tokenizer, so that the trunk does not hide the layers) are
cut. Weights are bf16 on disk, one shard per layer, in the hub's layout: one tensor per expert
(`mlp.experts.7.down_proj.weight`), which the streamed engine fuses with transformers' own
conversion as it reads a layer. The CLI compresses the model with `--streaming on` in a child
process that reports its own peak RSS (VmHWM).

    python bench/moe_scale.py [--layers 3] [--budget 3GB]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from scale import run_child  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QWEN3_30B_A3B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=4096,
)


def write_model(directory: Path, layers: int) -> dict:
    """Random bf16 shards, one per layer plus the trunk; returns the weight bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import TINY_CONFIGS, build_tiny_tokenizer

    from linearize.weights import ShardedWeights

    tiny = {k: v for k, v in TINY_CONFIGS["llama"].items() if k not in QWEN3_30B_A3B}
    config = AutoConfig.for_model(
        "qwen3_moe", **{**tiny, **QWEN3_30B_A3B, "num_hidden_layers": layers}
    )
    config.dtype = torch.bfloat16
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    groups: dict[str, dict] = {}
    for key, param in skeleton.state_dict().items():
        group = key.split(".")[2] if key.startswith("model.layers.") else "trunk"
        groups.setdefault(group, {})[key] = param
    weight_map = {}
    for number, params in enumerate(groups.values()):
        tensors = {key: random_like(key, p, generator) for key, p in params.items()}
        tensors = revert_weight_conversion(skeleton, tensors)  # the hub's per-expert names
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name))
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    weights = ShardedWeights.open(directory)
    return {
        "total": weights.total_bytes,
        "layer": weights.bytes_under("model.layers.0."),
        "tensors_per_layer": sum(1 for k in weights.entries if k.startswith("model.layers.0.")),
    }


def random_like(key: str, param, generator):
    import torch

    if key.endswith("norm.weight"):
        return torch.ones(param.shape, dtype=torch.bfloat16)
    return (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--budget", default="3GB")
    parser.add_argument(
        "--data", default=str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw")
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/moe_scale.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="linearize-moe-") as tmp:
        tmp = Path(tmp)
        baseline, _ = run_child([], tmp)
        model = tmp / "qwen3-moe"
        model.mkdir()
        started = time.perf_counter()
        weights = write_model(model, args.layers)
        print(f"wrote {weights['total'] / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s")
        report = tmp / "report.json"
        command = ["compress", "--model", str(model), "--data", args.data, "--layers", "1",
                   "--calib-tokens", "4096", "--eval-tokens", "512", "--seq-len", "256",
                   "--heal-steps", "0", "--generation-prompts", "0", "--dtype", "bfloat16",
                   "--streaming", "on", "--memory-budget", args.budget, "--no-cache",
                   "--quiet", "--force", "--output", str(tmp / "out"),
                   "--report", str(report)]  # fmt: skip
        peak, wall = run_child(command, tmp)
        data = json.loads(report.read_text())
    result = {
        "machine": describe(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shape": QWEN3_30B_A3B,
        "layers": args.layers,
        "budget": args.budget,
        "weight_bytes": weights,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "wall_s": round(wall, 1),
        "mode": data["execution"]["mode"],
        "replaced": data["replaced_layers"],
        "timings": data.get("timings"),
        "planned_peak": data["execution"].get("planned_peak_bytes"),
        "memory_plan": data["execution"].get("memory_plan"),
        "start_memory": data["execution"].get("start_memory_bytes"),
        # what each stage added to the peak: where the memory went
        "peak_rises": data["execution"].get("peak_rises"),
        "peak_stage": data["execution"].get("peak_stage"),
        "perplexity_reloaded_equals_compressed": data["perplexity"]["validation_reloaded"]
        == data["perplexity"]["validation_compressed"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    mib = 2**20
    print("| layers | weights MiB | one layer MiB | peak RSS MiB | empty process MiB | wall s |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.layers} | {weights['total'] / mib:.0f} | {weights['layer'] / mib:.0f} | "
          f"{peak / mib:.0f} | {baseline / mib:.0f} | {wall:.1f} |")  # fmt: skip
    print(json.dumps(result["timings"]))
    print(f"what each stage added to the peak (MiB), reached in {result['peak_stage']}:")
    for stage, rise in (result["peak_rises"] or {}).items():
        print(f"  {stage}: +{rise / mib:.0f}")


if __name__ == "__main__":
    main()
