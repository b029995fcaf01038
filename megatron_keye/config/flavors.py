"""Model flavors: `tiny` for tests, `small` for CPU benchmarks, `0.6b` and `8b` for Qwen3 shapes.

A flavor is a plain mapping of `ModelConfig` (or `VisionConfig`) fields; recipes name one and may
override any field. The tables are configuration data, so they live in `config/` where
`load_config` fills a recipe's model section from them; models/ and planning/ read them from here.
"""

from __future__ import annotations

# Vision marker ids of the tiny tokenizer shipped in data/text/assets (tests and CPU runs).
_TINY_TOKENIZER_VISION_IDS = dict(
    image_token_id=1289, video_token_id=1290, vision_start_token_id=1287, vision_end_token_id=1288,
)

FLAVORS: dict[str, dict] = {
    # Small enough that a 4-process gloo test step takes milliseconds, yet with GQA (4:2),
    # head_dim independent of hidden/heads, and sections that exercise all three M-RoPE axes.
    "tiny": dict(
        vocab_size=2048,
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=24,
        ffn_hidden_size=160,
        rope_base=1_000_000.0,
        mrope_section=[4, 4, 4],
        max_position_embeddings=4096,
        **_TINY_TOKENIZER_VISION_IDS,
    ),
    # CPU benchmark shapes: hidden 512, 8 layers, GQA 8:2.
    "small": dict(
        vocab_size=2048,
        hidden_size=512,
        num_layers=8,
        num_attention_heads=8,
        num_query_groups=2,
        head_dim=64,
        ffn_hidden_size=1536,
        rope_base=1_000_000.0,
        mrope_section=[8, 12, 12],
        max_position_embeddings=32768,
        **_TINY_TOKENIZER_VISION_IDS,
    ),
    # Qwen3-0.6B shapes (tied embeddings): the language model of a small Keye.
    "0.6b": dict(
        vocab_size=151936,
        hidden_size=1024,
        num_layers=28,
        num_attention_heads=16,
        num_query_groups=8,
        head_dim=128,
        ffn_hidden_size=3072,
        rope_base=1_000_000.0,
        mrope_section=[16, 24, 24],
        max_position_embeddings=40960,
        tie_word_embeddings=True,
    ),
    # Qwen3-8B, the Keye-VL-1.5 language model (spec section 1.3).
    "8b": dict(
        vocab_size=151936,
        hidden_size=4096,
        num_layers=36,
        num_attention_heads=32,
        num_query_groups=8,
        head_dim=128,
        ffn_hidden_size=12288,
        rope_base=1_000_000.0,
        mrope_section=[16, 24, 24],
        max_position_embeddings=131072,
    ),
}


def flavor_fields(name: str) -> dict:
    """The `ModelConfig` fields of a named flavor (a fresh copy)."""
    if name not in FLAVORS:
        raise ValueError(f"model.flavor: unknown flavor {name!r}; choose one of {sorted(FLAVORS)}")
    fields = dict(FLAVORS[name])
    fields["mrope_section"] = list(fields["mrope_section"])
    return fields


# Vision tower + projector presets (`model.vision.flavor`); the projector's output width is the
# language model's hidden size.
VISION_FLAVORS: dict[str, dict] = {
    # Tests: head_dim 12 (rope dim 6: 3 height + 3 width frequencies), a 6x6 position table so
    # test grids interpolate both up and down, heads divisible by TP=2.
    "tiny": dict(
        hidden_size=48,
        num_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=96,
        patch_size=14,
        position_grid=6,
    ),
    # CPU benchmark shapes: a third of so400m's width, 6 layers.
    "small": dict(
        hidden_size=384,
        num_layers=6,
        num_attention_heads=6,
        ffn_hidden_size=1536,
        patch_size=14,
        position_grid=27,
    ),
    # Keye-VL-1.5's SigLIP-so400m-patch14 tower (spec section 1.1).
    "8b": dict(
        hidden_size=1152,
        num_layers=27,
        num_attention_heads=16,
        ffn_hidden_size=4304,
        patch_size=14,
        position_grid=27,
    ),
}


def vision_flavor_fields(name: str) -> dict:
    """The `VisionConfig` fields of a named vision flavor (a fresh copy)."""
    if name not in VISION_FLAVORS:
        raise ValueError(
            f"model.vision.flavor: unknown flavor {name!r}; choose one of {sorted(VISION_FLAVORS)}"
        )
    return dict(VISION_FLAVORS[name])

