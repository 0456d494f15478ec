"""Tiny random models of the families without a registry entry (linearize.discovery), saved as
sharded safetensors in the hub's layout with the bundled byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

from tiny_models import TINY_CONFIGS, build_tiny_tokenizer

LAYERS = 4
_BASE = dict(TINY_CONFIGS["llama"], num_hidden_layers=LAYERS, head_dim=8)

FAMILY_CONFIGS: dict[str, dict] = {
    "olmo2": dict(_BASE),
    "granite": dict(_BASE, residual_multiplier=1.0, embedding_multiplier=1.0),
    "smollm3": dict(_BASE, no_rope_layers=[1, 1, 1, 0]),
    "cohere2": dict(
        _BASE, layer_types=["sliding_attention"] * 3 + ["full_attention"], sliding_window=16
    ),
    "glm4": dict(_BASE),
    # conv layers next to attention layers
    "lfm2": dict(_BASE, full_attn_idxs=[1, 3], block_auto_adjust_ff_dim=False),
    # attention and a mamba mixer side by side in every layer
    "falcon_h1": dict(
        _BASE,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_chunk_size=16,
    ),
}
FAMILIES = sorted(FAMILY_CONFIGS)


def build_family_config(family: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**FAMILY_CONFIGS[family], **overrides})


def build_family_model(family: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = build_family_config(family, initializer_range=0.3, **overrides)
    return AutoModelForCausalLM.from_config(config).eval()


def save_family_model(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Written in shards (model-0000i-of-0000n.safetensors and an index), as the hub holds them."""
    directory = Path(directory)
    model = build_family_model(family, seed=seed, **overrides)
    model.save_pretrained(directory, max_shard_size="40KB")
    build_tiny_tokenizer().save_pretrained(directory)
    return directory
