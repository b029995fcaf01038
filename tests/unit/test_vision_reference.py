"""The production vision tower + projector against an independent plain-PyTorch reference.

The reference below is written from the spec (reference/keye-vl-1.5.md §1.1-1.2) with HF/SigLIP
parameter names, float64 and explicit loops: F.conv2d patch embedding, the absolute table
interpolated per frame, the 2D RoPE table built as (N, 2, rope/2) → flattened → repeated twice
and applied rotate-half, softmax attention per frame, pre-LN blocks, post-layernorm, and the
projector's 2×2 merge token by token. It imports nothing from megatron_keye. The production
modules run at TP=1 in a spawned world of one (megatron-core needs its parallel state) on the
same random weights, copied across by name (qkv rows per head as megatron lays them out).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_keye.config.schema import VisionConfig
from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers_vision import (
    LM_HIDDEN,
    full_vision_weights,
    vision_case,
    vision_worker,
)

TOLERANCE = 1e-5


# --- the independent reference --------------------------------------------------------------


def reference_weights(native: dict, vc: VisionConfig) -> dict:
    """HF/SigLIP-named tensors derived (differentiably) from the native full weights."""
    h, heads = vc.hidden_size, vc.num_attention_heads
    hd = h // heads
    out = {
        "embeddings.patch_embedding.weight": native["tower.patch_embedding.weight"],
        "embeddings.patch_embedding.bias": native["tower.patch_embedding.bias"],
        "embeddings.position_embedding.weight": native["tower.position_embedding.weight"],
        "post_layernorm.weight": native["tower.encoder.final_layernorm.weight"],
        "post_layernorm.bias": native["tower.encoder.final_layernorm.bias"],
        "mlp_AR.pre_norm.weight": native["projector.pre_norm.weight"],
        "mlp_AR.pre_norm.bias": native["projector.pre_norm.bias"],
        "mlp_AR.linear_1.weight": native["projector.linear_1.weight"],
        "mlp_AR.linear_1.bias": native["projector.linear_1.bias"],
        "mlp_AR.linear_2.weight": native["projector.linear_2.weight"],
        "mlp_AR.linear_2.bias": native["projector.linear_2.bias"],
    }
    for i in range(vc.num_layers):
        src, dst = f"tower.encoder.layers.{i}.", f"encoder.layers.{i}."
        qkv_w = native[src + "self_attention.linear_qkv.weight"].reshape(heads, 3, hd, h)
        qkv_b = native[src + "self_attention.linear_qkv.bias"].reshape(heads, 3, hd)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"] = qkv_w[:, j].reshape(h, h)
            out[dst + f"self_attn.{name}.bias"] = qkv_b[:, j].reshape(h)
        pairs = {
            "self_attn.out_proj": "self_attention.linear_proj",
            "layer_norm1": "input_layernorm",
            "layer_norm2": "pre_mlp_layernorm",
            "mlp.fc1": "mlp.linear_fc1",
            "mlp.fc2": "mlp.linear_fc2",
        }
        for ref_name, native_name in pairs.items():
            for kind in ("weight", "bias"):
                out[dst + f"{ref_name}.{kind}"] = native[src + f"{native_name}.{kind}"]
    return out


def _frames(grids: torch.Tensor) -> list[tuple[int, int]]:
    frames = []
    for t, h, w in grids.tolist():
        frames += [(h, w)] * t
    return frames


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _rotate_half(x):
    half = x.size(-1) // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_tower(w: dict, pixels: torch.Tensor, grids: torch.Tensor,
                    vc: VisionConfig) -> torch.Tensor:
    """SigLIP-style tower of spec §1.1 on patch rows [P, 3, 14, 14] → [P, hidden]."""
    h, heads = vc.hidden_size, vc.num_attention_heads
    hd, side = h // heads, vc.position_grid
    x = F.conv2d(pixels, w["embeddings.patch_embedding.weight"],
                 w["embeddings.patch_embedding.bias"], stride=vc.patch_size).reshape(-1, h)
    table = w["embeddings.position_embedding.weight"].reshape(side, side, h).permute(2, 0, 1)
    positions = []
    for t, gh, gw in grids.tolist():
        resized = F.interpolate(table[None], size=(gh, gw), mode="bilinear", align_corners=False)
        positions.append(resized[0].reshape(h, gh * gw).T.repeat(t, 1))
    x = x + torch.cat(positions)
    # 2D RoPE: dim = head_dim / 2, inv_freq over that dim; [h freqs | w freqs] repeated twice.
    rope_dim = hd // 2
    inv_freq = 1.0 / vc.rope_theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    tables, spans, start = [], [], 0
    for gh, gw in _frames(grids):
        p = torch.arange(gh * gw)
        ids = torch.stack([p // gw, p % gw], dim=-1).double()  # (N, 2)
        freqs = (ids[..., None] * inv_freq).reshape(gh * gw, rope_dim)  # (N, 2, r/2) → (N, r)
        tables.append(torch.cat([freqs, freqs], dim=-1))  # repeat(1, 2) → head_dim
        spans.append((start, gh * gw))
        start += gh * gw
    angles = torch.cat(tables)[:, None, :]  # [P, 1, head_dim]
    cos, sin = angles.cos(), angles.sin()
    for i in range(vc.num_layers):
        lw = {k[len(f"encoder.layers.{i}."):]: v for k, v in w.items()
              if k.startswith(f"encoder.layers.{i}.")}
        residual = x
        y = _layer_norm(x, lw["layer_norm1.weight"], lw["layer_norm1.bias"], vc.layer_norm_eps)
        q, k, v = (F.linear(y, lw[f"self_attn.{n}.weight"], lw[f"self_attn.{n}.bias"])
                   .reshape(-1, heads, hd) for n in ("q_proj", "k_proj", "v_proj"))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        outs = []
        for first, length in spans:  # attention within each image / frame only
            qs, ks, vs = (t[first:first + length].transpose(0, 1) for t in (q, k, v))
            probs = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(hd), dim=-1)
            outs.append((probs @ vs).transpose(0, 1).reshape(length, h))
        x = residual + F.linear(torch.cat(outs), lw["self_attn.out_proj.weight"],
                                lw["self_attn.out_proj.bias"])
        residual = x
        y = _layer_norm(x, lw["layer_norm2.weight"], lw["layer_norm2.bias"], vc.layer_norm_eps)
        y = F.gelu(F.linear(y, lw["mlp.fc1.weight"], lw["mlp.fc1.bias"]), approximate="tanh")
        x = residual + F.linear(y, lw["mlp.fc2.weight"], lw["mlp.fc2.bias"])
    return _layer_norm(x, w["post_layernorm.weight"], w["post_layernorm.bias"], vc.layer_norm_eps)


def reference_projector(w: dict, features: torch.Tensor, grids: torch.Tensor,
                        vc: VisionConfig) -> torch.Tensor:
    """mlp_AR of spec §1.2: 2x2 merge token by token, LayerNorm, linear, exact GELU, linear."""
    tokens, start = [], 0
    for gh, gw in _frames(grids):
        for i in range(gh // 2):
            for j in range(gw // 2):
                parts = [start + (2 * i + di) * gw + 2 * j + dj for di in (0, 1) for dj in (0, 1)]
                tokens.append(torch.cat([features[p] for p in parts]))
        start += gh * gw
    x = _layer_norm(torch.stack(tokens), w["mlp_AR.pre_norm.weight"], w["mlp_AR.pre_norm.bias"],
                    vc.projector_norm_eps)
    x = F.gelu(F.linear(x, w["mlp_AR.linear_1.weight"], w["mlp_AR.linear_1.bias"]))
    return F.linear(x, w["mlp_AR.linear_2.weight"], w["mlp_AR.linear_2.bias"])


# --- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    vc = VisionConfig.from_flavor("tiny")
    case, weights = vision_case(), full_vision_weights()
    (result,) = run_workers(vision_worker, 1, layouts=[{"name": "tp1", "tensor": 1}],
                            case=case, weights=weights)
    native = {k: v.double().requires_grad_(True) for k, v in weights.items()}
    ref_w = reference_weights(native, vc)
    features = reference_tower(ref_w, case["pixel_values"].double(), case["grids"], vc)
    embeddings = reference_projector(ref_w, features, case["grids"], vc)
    loss = ((features * case["feature_grad"].double()).sum()
            + (embeddings * case["embedding_grad"].double()).sum())
    loss.backward()
    reference = {"features": features.detach(), "embeddings": embeddings.detach(),
                 "grads": {k: v.grad for k, v in native.items()}}
    return {"vc": vc, "case": case, "result": result["tp1"], "reference": reference}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_outputs_equal_the_reference(setup):
    result, reference, case = setup["result"], setup["reference"], setup["case"]
    assert result["features"].shape == (int(case["grids"].prod(1).sum()), setup["vc"].hidden_size)
    assert result["embeddings"].shape == (result["features"].size(0) // 4, LM_HIDDEN)
    assert _relative(result["features"], reference["features"]) <= TOLERANCE
    assert _relative(result["embeddings"], reference["embeddings"]) <= TOLERANCE


def test_gradients_equal_the_reference(setup):
    grads, reference = setup["result"]["grads"], setup["reference"]["grads"]
    assert set(grads) == set(reference)
    for name, grad in reference.items():
        assert grad.abs().max() > 0, name
        assert _relative(grads[name], grad) <= TOLERANCE, name


def test_reference_is_sensitive_to_rope_and_positions(setup):
    """The oracle is not vacuous: without the 2D RoPE or with unit-grid positions it differs."""
    vc, case = setup["vc"], setup["case"]
    weights = {k: v.double() for k, v in full_vision_weights().items()}
    # A huge base leaves only the first frequency pair rotating: most of the RoPE is gone.
    no_rope = VisionConfig.from_flavor("tiny", rope_theta=1e30)
    ref_w = reference_weights(weights, vc)
    plain = reference_tower(ref_w, case["pixel_values"].double(), case["grids"], no_rope)
    assert _relative(plain, setup["reference"]["features"]) > 1e-3


def test_one_image_changes_only_its_own_embeddings(setup):
    result, grids = setup["result"], setup["case"]["grids"]
    first = int(grids[0].prod())
    for key, rows in (("features", first), ("embeddings", first // 4)):
        before, after = result[key], result[f"perturbed_{key}"]
        assert not torch.allclose(before[:rows], after[:rows])
        assert torch.equal(before[rows:], after[rows:]), key


def test_bad_grids_name_the_field():
    from megatron_keye.models.keye_vl.projector import merge_patches
    from megatron_keye.models.keye_vl.vision import check_grids

    vc = VisionConfig.from_flavor("tiny")
    pixels = torch.zeros(8, 3, 14, 14)
    with pytest.raises(ValueError, match="vision_grids describe 6"):
        check_grids(pixels, torch.tensor([[1, 2, 3]]), vc)
    with pytest.raises(ValueError, match=r"vision_grids\[1\]"):
        check_grids(pixels, torch.tensor([[1, 2, 4], [0, 1, 1]]), vc)
    with pytest.raises(ValueError, match="pixel_values must be"):
        check_grids(torch.zeros(8, 3, 16, 16), torch.tensor([[1, 2, 4]]), vc)
    with pytest.raises(ValueError, match="frame 1 has grid"):
        merge_patches(torch.zeros(14, 4), torch.tensor([[1, 2, 2], [1, 2, 5]]), 2)


def test_core_attention_packs_frames_without_a_row_mask(monkeypatch):
    """Bidirectional segments take the per-sequence path (no [s, s] mask) and equal the
    masked computation."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_keye.ops.attention import core, masks
    from megatron_keye.ops.attention.inputs import AttentionInputs

    g = torch.Generator().manual_seed(3)
    seg = torch.tensor([[0] * 6 + [1] * 4 + [2] * 6 + [3] * 2])
    q, k, v = (torch.randn(18, 1, 4, 8, generator=g, requires_grad=True) for _ in range(3))
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               attention_dropout=0.0, use_cpu_initialization=True)
    attention = core.CoreAttention(config, 1, AttnMaskType.no_mask, "self", backend="sdpa")
    expected = core.sdpa_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), causal=False,
                                   scale=attention.softmax_scale, segments=seg)
    expected = expected.permute(2, 0, 1, 3).reshape(18, 1, 32)

    def refuse(*args, **kwargs):
        raise AssertionError("a row-wide mask was built")

    monkeypatch.setattr(core, "segment_mask", refuse)
    monkeypatch.setattr(masks, "segment_mask", refuse)
    out = attention(q, k, v, None, packed_seq_params=AttentionInputs(segments=seg))
    assert _relative(out, expected) <= 1e-6


def test_layouts_and_backends_that_cannot_work_are_refused(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_keye.config.schema import ParallelConfig
    from megatron_keye.config.validation import check_vision_config
    from megatron_keye.models.keye_vl.specs import vision_block_spec
    from megatron_keye.models.keye_vl.vision import vision_transformer_config

    vc = VisionConfig.from_flavor("tiny")
    with pytest.raises(ValueError, match=r"model.vision.num_attention_heads: 4 is not divisible "
                                         r"by parallel.tensor=3"):
        check_vision_config(vc, ParallelConfig(tensor=3))
    with pytest.raises(ValueError, match="multiple of 4"):
        check_vision_config(VisionConfig.from_flavor("tiny", num_attention_heads=8),
                            ParallelConfig())
    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", False)
    with pytest.raises(ImportError, match="TransformerEngine"):
        vision_block_spec(vision_transformer_config(vc, ParallelConfig()), attention_backend="te")


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_sdpa_equals_masked_attention(causal):
    """Two rows, runs of equal-length sequences, GQA; outputs and input gradients."""
    from megatron_keye.ops.attention.core import sdpa_attention
    from megatron_keye.ops.attention.varlen import varlen_sdpa

    g = torch.Generator().manual_seed(5)
    seg = torch.tensor([[0] * 5 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 2, [0] * 7 + [1] * 8 + [2]])
    q = torch.randn(2, 4, 16, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 8, generator=g, requires_grad=True) for _ in range(2))
    got = varlen_sdpa(q, k, v, segments=seg, causal=causal, scale=0.3)
    expected = sdpa_attention(q, k, v, causal=causal, segments=seg, scale=0.3)
    cotangent = torch.randn(expected.shape, generator=g)
    grads = torch.autograd.grad(got, (q, k, v), cotangent)
    expected_grads = torch.autograd.grad(expected, (q, k, v), cotangent)
    assert _relative(got, expected) <= 1e-6
    for a, b in zip(grads, expected_grads, strict=True):
        assert _relative(a, b) <= 1e-6
