"""Tiny random models and a byte-level tokenizer for tests: built in seconds, no network.

`build_tiny_model(arch)` returns an eval-mode model; `save_tiny_model(arch, dir)` writes it with a
tokenizer as a local checkpoint directory, the way a user's model arrives.
"""

from __future__ import annotations

from pathlib import Path

TINY_VOCAB = 260  # 256 bytes + a few specials
HIDDEN = 32

_COMMON = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=TINY_VOCAB,
    max_position_embeddings=256,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=None),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=8),
    "phi3": dict(_COMMON, original_max_position_embeddings=256),
    "gemma2": dict(_COMMON, head_dim=8, sliding_window=16),
    "gemma3_text": dict(_COMMON, head_dim=8, sliding_window=16),
    "gpt2": dict(
        n_embd=HIDDEN,
        n_layer=6,
        n_head=4,
        vocab_size=TINY_VOCAB,
        n_positions=256,
        bos_token_id=256,
        eos_token_id=257,
    ),
    "opt": dict(
        hidden_size=HIDDEN,
        ffn_dim=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        vocab_size=TINY_VOCAB,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=256,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    ),
    "gpt_neox": dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=256,
        bos_token_id=256,
        eos_token_id=257,
    ),
}

ARCHITECTURES = sorted(TINY_CONFIGS)  # before the MoE families below join TINY_CONFIGS


def build_tiny_config(arch: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, **{**TINY_CONFIGS[arch], **overrides})


def build_tiny_model(arch: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_tiny_config(arch, **overrides))
    return model.eval()


def build_tiny_tokenizer():
    """Byte-level BPE with no merges: every UTF-8 byte is a token; specials 256..258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for i, special in enumerate(["<s>", "</s>", "<pad>", "<unk>"]):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = byte_pre
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def save_tiny_model(arch: str, directory: Path, seed: int = 0, **overrides) -> Path:
    directory = Path(directory)
    model = build_tiny_model(arch, seed=seed, **overrides)
    model.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


# Mixture-of-experts families: 4 experts, top-2 (llama4: top-1, as it ships), and a mixed
# dense/sparse pattern where the family has one, so that pattern trimming is exercised.
_MOE = dict(_COMMON, num_experts_per_tok=2)
TINY_MOE_CONFIGS: dict[str, dict] = {
    "qwen2_moe": dict(
        _MOE,
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
    ),
    "qwen3_moe": dict(
        _MOE, num_experts=4, moe_intermediate_size=16, head_dim=8, mlp_only_layers=[1, 4]
    ),
    # Hybrid: Gated DeltaNet (linear attention) and full attention layers alternate; a dense
    # MLP at layer 4, a sigmoid-gated shared expert next to the routed ones elsewhere.
    "qwen3_next": dict(
        _MOE,
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[4],
        full_attention_interval=2,
        head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    ),
    "mixtral": dict(_MOE, num_local_experts=4, sliding_window=None),
    "olmoe": dict(_MOE, num_experts=4),
    "granitemoe": dict(_MOE, num_local_experts=4, residual_multiplier=0.5),
    "gpt_oss": dict(_MOE, num_local_experts=4, head_dim=8, sliding_window=16),
    "deepseek_v3": dict(
        _MOE,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        head_dim=4,
    ),
    "llama4_text": dict(
        _COMMON,
        num_local_experts=4,
        num_experts_per_tok=1,
        intermediate_size=16,
        intermediate_size_mlp=64,
        interleave_moe_layer_step=2,
        head_dim=8,
        attention_chunk_size=64,
    ),
}
# ARCHITECTURES (the dense families) parametrise the generic surgery and checkpoint tests;
# tests/test_moe.py covers these with MOE_ARCHITECTURES.
TINY_CONFIGS.update(TINY_MOE_CONFIGS)
MOE_ARCHITECTURES = sorted(TINY_MOE_CONFIGS)
