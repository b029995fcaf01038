"""Merge methods on hand-built tensors equal hand-computed results."""

from __future__ import annotations

import pytest
import torch

from megatron_keye.post_training.merging import (
    MergeSpec,
    dare_keep_mask,
    magnitude_mask,
    merge_state_dicts,
    merge_tensor,
)

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
# Task vectors of two models (θ_i = BASE + τ_i).
TAU_A = torch.tensor([3.0, -2.0, 0.5, 1.0, -0.25])
TAU_B = torch.tensor([-1.0, -4.0, 2.0, 0.1, 0.5])


def test_magnitude_mask_keeps_exactly_k_with_ties_broken_by_index():
    assert magnitude_mask(TAU_A, 0.4).tolist() == [True, True, False, False, False]
    assert magnitude_mask(TAU_B, 0.4).tolist() == [False, True, True, False, False]
    equal = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    assert magnitude_mask(equal, 0.5).tolist() == [[True, True], [False, False]]
    assert magnitude_mask(equal, 0.2).sum() == 0  # ⌊0.8⌋ = 0 entries
    assert magnitude_mask(equal, 1.0).all()


def test_linear_and_task_arithmetic():
    a, b = BASE + TAU_A, BASE + TAU_B
    linear = merge_tensor("w", [a, b], None, MergeSpec(method="linear", weights=(1.0, 3.0)))
    torch.testing.assert_close(linear, (a + 3 * b) / 4, rtol=0, atol=1e-7)
    unnormalized = merge_tensor("w", [a, b], None,
                                MergeSpec(method="linear", weights=(1.0, 3.0), normalize=False))
    torch.testing.assert_close(unnormalized, a + 3 * b, rtol=0, atol=1e-6)
    ta = merge_tensor("w", [a, b], BASE,
                      MergeSpec(method="task_arithmetic", weights=(0.5, 2.0), scale=0.7))
    torch.testing.assert_close(ta, BASE + 0.7 * (0.5 * TAU_A + 2.0 * TAU_B), rtol=0, atol=1e-6)


def test_ties_trim_elect_disjoint_mean():
    a, b = BASE + TAU_A, BASE + TAU_B
    # density 0.4 keeps 2 of 5: τ̂_A = [3, -2, 0, 0, 0], τ̂_B = [0, -4, 2, 0, 0].
    # weights (2, 1): Σ wτ̂ = [6, -8, 2, 0, 0] → γ = [+, -, +, 0, 0].
    # disjoint mean: [6/2, (-4 - 4)/3, 2/1, 0, 0]; θ = base + λ·that.
    spec = MergeSpec(method="ties", weights=(2.0, 1.0), density=0.4, scale=0.5)
    expected = BASE + 0.5 * torch.tensor([3.0, -8.0 / 3.0, 2.0, 0.0, 0.0])
    torch.testing.assert_close(merge_tensor("w", [a, b], BASE, spec), expected, rtol=0, atol=1e-6)
    # Without normalization the agreeing values are summed.
    spec = MergeSpec(method="ties", weights=(2.0, 1.0), density=0.4, normalize=False)
    expected = BASE + torch.tensor([6.0, -8.0, 2.0, 0.0, 0.0])
    torch.testing.assert_close(merge_tensor("w", [a, b], BASE, spec), expected, rtol=0, atol=1e-6)


def test_ties_sign_election_sum_versus_count():
    taus = [torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    models = [BASE[:1] + t for t in taus]
    by_sum = merge_tensor("w", models, BASE[:1], MergeSpec(method="ties"))
    by_count = merge_tensor("w", models, BASE[:1], MergeSpec(method="ties", sign_election="count"))
    torch.testing.assert_close(by_sum, BASE[:1] + 5.0)  # Σ = 3 > 0: only the +5 agrees
    torch.testing.assert_close(by_count, BASE[:1] - 1.0)  # two negatives out-vote one positive


def test_dare_masks_are_seeded_by_name_and_model_only():
    first = dare_keep_mask("decoder.layers.0.mlp.linear_fc1.weight", 0, (64, 64), density=0.3,
                           seed=5)
    again = dare_keep_mask("decoder.layers.0.mlp.linear_fc1.weight", 0, (64, 64), density=0.3,
                           seed=5)
    assert torch.equal(first, again)
    assert abs(first.float().mean().item() - 0.3) < 0.03
    assert not torch.equal(first, dare_keep_mask("decoder.layers.1.mlp.linear_fc1.weight", 0,
                                                 (64, 64), density=0.3, seed=5))
    assert not torch.equal(first, dare_keep_mask("decoder.layers.0.mlp.linear_fc1.weight", 1,
                                                 (64, 64), density=0.3, seed=5))
    assert not torch.equal(first, dare_keep_mask("decoder.layers.0.mlp.linear_fc1.weight", 0,
                                                 (64, 64), density=0.3, seed=6))


def test_dare_linear_and_ties_equal_hand_computation():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    taus = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    models = [base + t for t in taus]
    weights, density, scale = (1.0, 0.5, 2.0), 0.6, 0.8
    masks = [dare_keep_mask("p", i, (6, 5), density=density, seed=11).float() for i in range(3)]
    assert all(0 < m.sum() < m.numel() for m in masks)
    dropped = [m * t / density for m, t in zip(masks, taus)]

    spec = MergeSpec(method="dare_linear", weights=weights, density=density, scale=scale, seed=11)
    expected = base + scale * sum(w * d for w, d in zip(weights, dropped))
    torch.testing.assert_close(merge_tensor("p", models, base, spec), expected, rtol=1e-6,
                               atol=1e-6)

    spec = MergeSpec(method="dare_ties", weights=weights, density=density, scale=scale, seed=11)
    # Element by element, in plain Python: elect by the weighted sum, average the agreeing.
    expected = base.clone()
    for r in range(6):
        for c in range(5):
            values = [float(d[r, c]) for d in dropped]
            total = sum(w * v for w, v in zip(weights, values))
            sign = (total > 0) - (total < 0)
            agree = [(w, v) for w, v in zip(weights, values) if v != 0 and ((v > 0) - (v < 0)) == sign]
            if agree:
                expected[r, c] += scale * sum(w * v for w, v in agree) / sum(w for w, _ in agree)
    torch.testing.assert_close(merge_tensor("p", models, base, spec), expected, rtol=1e-6,
                               atol=1e-6)


def test_state_dicts_unpad_vocab_rows_and_check_names():
    gen = torch.Generator().manual_seed(1)
    vocab, padded = 5, 8
    base = {"embedding.word_embeddings.weight": torch.randn(padded, 3, generator=gen),
            "decoder.final_layernorm.weight": torch.ones(3)}
    # The other model was padded differently (6 rows): only the first 5 rows take part.
    other = {"embedding.word_embeddings.weight": torch.randn(6, 3, generator=gen),
             "decoder.final_layernorm.weight": torch.full((3,), 2.0)}
    # Padding rows of huge magnitude would win TIES's top-k if they were not cut first.
    base["embedding.word_embeddings.weight"][vocab:] = 1e6
    spec = MergeSpec(method="ties", density=0.5)
    merged = merge_state_dicts([base, other], base, spec, vocab_size=vocab, padded_vocab_size=padded)
    emb = merged["embedding.word_embeddings.weight"]
    assert emb.shape == (padded, 3)
    assert torch.equal(emb[vocab:], torch.zeros(padded - vocab, 3))
    rows = [base["embedding.word_embeddings.weight"][:vocab],
            other["embedding.word_embeddings.weight"][:vocab]]
    torch.testing.assert_close(emb[:vocab], merge_tensor("e", rows, rows[0], spec))
    with pytest.raises(ValueError, match="different parameters"):
        merge_state_dicts([base, {"x": torch.ones(1)}], base, spec, vocab_size=vocab,
                          padded_vocab_size=padded, sources=["a", "b"])
    with pytest.raises(ValueError, match="needs a base"):
        merge_state_dicts([base, other], None, spec, vocab_size=vocab, padded_vocab_size=padded)
    with pytest.raises(ValueError, match="density"):
        MergeSpec(method="ties", density=0.0)
    with pytest.raises(ValueError, match="weights"):
        merge_state_dicts([base, other], base, MergeSpec(method="ties", weights=(1.0,)),
                          vocab_size=vocab, padded_vocab_size=padded)
