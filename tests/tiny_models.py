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

ARCHITECTURES = sorted(TINY_CONFIGS)


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
