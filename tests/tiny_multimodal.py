"""Tiny random multimodal wrappers (vision tower + projector + language backbone), saved the way
the hub ships each family: sharded safetensors in the family's on-disk key layout (transformers
reverts its load-time renames on save, e.g. llava's `language_model.model.layers.N.`), the
bundled tokenizer's vocabulary plus image tokens, a chat template, a generation config and a
model card. `image_text_inputs` builds a matching image + text batch for a forward.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import HIDDEN, TINY_CONFIGS, build_tiny_tokenizer

IMAGE_TOKEN, EXTRA_TOKENS = "<image>", ("<boi>", "<eoi>")
IMAGE_ID, BOI_ID, EOI_ID = 260, 261, 262  # appended to the tiny tokenizer's 260 tokens
VOCAB = 264
IMAGE = 28  # pixels a side; 14-pixel patches: a 2 x 2 grid
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"

# The tiny llama's text sizes; the vocabulary grows by the image tokens.
_TEXT = dict(TINY_CONFIGS["llama"], vocab_size=VOCAB, initializer_range=0.3)
_VISION = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=IMAGE,
    patch_size=14,
)
_QWEN_VISION = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_heads=4,
    out_hidden_size=HIDDEN,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
_QWEN_IDS = dict(image_token_id=IMAGE_ID, video_token_id=EOI_ID, vision_start_token_id=BOI_ID)

MULTIMODAL_CONFIGS: dict[str, dict] = {
    "llava": dict(
        text_config=dict(_TEXT, model_type="llama"),
        vision_config=dict(_VISION, model_type="clip_vision_model", projection_dim=HIDDEN),
        image_token_id=IMAGE_ID,
        vision_feature_layer=-1,
    ),
    "qwen2_5_vl": dict(
        text_config=dict(
            _TEXT,
            model_type="qwen2_5_vl_text",
            rope_scaling=dict(type="mrope", mrope_section=[1, 1, 2]),
        ),
        vision_config=dict(_QWEN_VISION, depth=1, window_size=56, fullatt_block_indexes=[0]),
        **_QWEN_IDS,
    ),
    "gemma3": dict(
        text_config=dict(_TEXT, model_type="gemma3_text", head_dim=8, sliding_window=16),
        vision_config=dict(_VISION, model_type="siglip_vision_model"),
        mm_tokens_per_image=4,
        image_token_id=IMAGE_ID,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
    ),
    "mistral3": dict(
        text_config=dict(_TEXT, model_type="mistral", sliding_window=None, head_dim=8),
        # 56 pixels: a 4 x 4 patch grid merged 2 x 2 (one merged token trips the projector).
        vision_config=dict(_VISION, model_type="pixtral", head_dim=8, image_size=56),
        image_token_id=IMAGE_ID,
        vision_feature_layer=-1,
        spatial_merge_size=2,
    ),
    "qwen3_vl": dict(
        text_config=dict(
            _TEXT,
            model_type="qwen3_vl_text",
            head_dim=8,
            rope_scaling=dict(rope_type="default", mrope_section=[1, 1, 2], mrope_interleaved=True),
        ),
        vision_config=dict(
            _QWEN_VISION, depth=2, num_position_embeddings=16, deepstack_visual_indexes=[0]
        ),
        **_QWEN_IDS,
    ),
    # A mixture-of-experts backbone (every other layer sparse); 14-pixel patches of a 28-pixel
    # tile, pixel-shuffled by 0.5, make one image token. The vision MLP widens the shuffled
    # patches 4x (hidden_size x 4 = intermediate_size), as the release's 1408 -> 5632.
    "llama4": dict(
        text_config=dict(
            TINY_CONFIGS["llama4_text"],
            model_type="llama4_text",
            vocab_size=VOCAB,
            initializer_range=0.3,
        ),
        vision_config=dict(
            _VISION,
            intermediate_size=4 * HIDDEN,
            vision_output_dim=HIDDEN,
            projector_input_dim=HIDDEN,
            projector_output_dim=HIDDEN,
            pixel_shuffle_ratio=0.5,
        ),
        image_token_index=IMAGE_ID,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
    ),
}
MULTIMODAL = list(MULTIMODAL_CONFIGS)


def build_multimodal_model(family: str, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **MULTIMODAL_CONFIGS[family])
    return AutoModelForImageTextToText.from_config(config).eval()


def save_multimodal_model(family: str, directory: Path, seed: int = 0) -> Path:
    """The model in 20 kB shards (so the layers spread over several files), its tokenizer with
    the image tokens and a chat template, and a model card."""
    directory = Path(directory)
    build_multimodal_model(family, seed).save_pretrained(directory, max_shard_size="20KB")
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *EXTRA_TOKENS]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "tiny", "size": IMAGE}, indent=1)
    )
    (directory / "README.md").write_text(f"# tiny {family}\n\nThe source's own model card.\n")
    return directory


def image_text_inputs(family: str) -> dict:
    """One 28 x 28 image and a few text tokens, with as many image tokens as the tower yields."""
    import torch

    text = torch.tensor([[72, 101, 108, 108, 111]])
    if family in ("qwen2_5_vl", "qwen3_vl"):
        # Flattened patches: a 1 x 2 x 2 grid of 3 x 2 x 14 x 14 patches, merged 2 x 2 into one token.
        pixels = torch.randn(4, 3 * 2 * 14 * 14)
        ids = torch.cat([torch.tensor([[BOI_ID, IMAGE_ID]]), text], dim=1)
        inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 2, 2]]))
        if family == "qwen3_vl":  # which positions are image tokens (its processor returns it)
            inputs["mm_token_type_ids"] = (ids == IMAGE_ID).int()
        return inputs
    side = 2 * IMAGE if family == "mistral3" else IMAGE
    count = 1 if family == "llama4" else 4  # image tokens per image
    ids = torch.cat([torch.full((1, count), IMAGE_ID), text], dim=1)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, side, side))
    if family == "mistral3":
        inputs["image_sizes"] = torch.tensor([[side, side]])
    return inputs
