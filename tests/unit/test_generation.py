"""Generation pieces without a model: the KV cache's attention, token choice, prompts, the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_keye.ops.attention.kv_cache import KVCache
from megatron_keye.post_training.generation import GenerationOptions, Prompt, _build_batch
from megatron_keye.post_training.sampling import SamplingParams, choose_tokens, row_generator


def _full_attention(q, k, v, *, scale):
    """Causal attention of one unpadded row [1, h, s, d] with GQA (explicit repeat)."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q.size(2)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_kv_cache_prefill_then_decode_equals_full_attention():
    """Left-padded rows, prefill then one token per step: each row equals its own full causal
    attention; padding never changes a real token's output."""
    g = torch.Generator().manual_seed(0)
    lengths, total, heads, groups, dim, steps = [5, 3], 5, 4, 2, 8, 3
    capacity = total + steps
    full = {n: (torch.randn(1, heads, n + steps, dim, generator=g),
                torch.randn(1, groups, n + steps, dim, generator=g),
                torch.randn(1, groups, n + steps, dim, generator=g)) for n in lengths}
    valid = torch.ones(len(lengths), capacity, dtype=torch.bool)
    for r, n in enumerate(lengths):
        valid[r, : total - n] = False
    cache = KVCache(key_valid=valid)

    def padded(part, stop):  # rows left-padded to `total`, then the decoded slots
        rows = []
        for n in lengths:
            x = full[n][part]
            pad = torch.randn(1, x.size(1), total - n, dim, generator=g)  # garbage, masked out
            rows.append(torch.cat([pad, x], dim=2)[:, :, :stop])
        return torch.cat(rows)

    scale = dim**-0.5
    q, k, v = (padded(i, total + steps) for i in range(3))
    outputs = [cache.attend(1, q[:, :, :total], k[:, :, :total], v[:, :, :total], scale=scale)]
    cache.advance(total)
    for step in range(steps):
        at = slice(total + step, total + step + 1)
        outputs.append(cache.attend(1, q[:, :, at], k[:, :, at], v[:, :, at], scale=scale))
        cache.advance(1)
    ours = torch.cat(outputs, dim=2)
    for r, n in enumerate(lengths):
        expected = _full_attention(*full[n], scale=scale)[0]
        got = ours[r, :, total - n:]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ours).all()  # padding queries see themselves: no NaN
    with pytest.raises(ValueError, match="capacity"):
        cache.attend(1, q[:, :, :1], k[:, :, :1], v[:, :, :1], scale=scale)


def test_greedy_choice_ignores_padded_vocabulary_and_reports_logprob():
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    logits[:, 12:] = 50.0  # columns past the vocabulary must never win
    tokens, logprobs = choose_tokens(logits, params=SamplingParams(), generators=[],
                                     vocab_size=12, group=None, tp_rank=0)
    assert torch.equal(tokens, logits[:, :12].argmax(-1))
    expected = F.log_softmax(logits[:, :12], -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)


def test_top_p_sampling_stays_in_the_nucleus_and_follows_the_distribution():
    # p = [0.5, 0.3, 0.15, 0.05]: top_p 0.75 keeps tokens 0 and 1 (0.5 < 0.75 <= 0.8).
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=3)
    generators = [row_generator(3, r) for r in range(4000)]
    tokens, logprobs = choose_tokens(logits, params=params, generators=generators, vocab_size=4,
                                     group=None, tp_rank=0)
    assert set(tokens.tolist()) == {0, 1}
    share = (tokens == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.03
    # log-probs are of the untruncated policy at this temperature
    torch.testing.assert_close(logprobs, probs.log()[tokens])
    again, _ = choose_tokens(logits, params=params,
                             generators=[row_generator(3, r) for r in range(4000)],
                             vocab_size=4, group=None, tp_rank=0)
    assert torch.equal(again, tokens)


def test_options_and_params_refuse_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationOptions(max_new_tokens=0)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        GenerationOptions(samples_per_prompt=0)


def test_batch_left_pads_and_continues_positions():
    a = Prompt(tokens=torch.tensor([5, 6, 7]))
    positions = torch.tensor([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 4]])
    b = Prompt(tokens=torch.arange(10, 16), position_ids=positions)
    batch = _build_batch([a, b], 2, pad_id=0)
    assert batch.tokens.shape == (4, 6)
    assert batch.tokens[0].tolist() == [0, 0, 0, 5, 6, 7]
    assert batch.valid[1].tolist() == [False, False, False, True, True, True]
    assert batch.next_position.tolist() == [3, 3, 5, 5]  # after the prompt's largest id
    assert torch.equal(batch.position_ids[:, 2], positions)


def test_image_prompt_has_its_pads_and_block_positions():
    from megatron_keye.data.media.image import ImageConfig
    from megatron_keye.data.media.synthetic_media import synthetic_image
    from megatron_keye.data.text.tokenizer import KeyeTokenizer
    from megatron_keye.post_training.prompts import build_prompt

    tok = KeyeTokenizer.default()
    config = ImageConfig(min_pixels=4 * 784, max_pixels=12 * 784)
    prompt = build_prompt("What is it?", tokenizer=tok, images=[synthetic_image(56, 84, seed=1)],
                          image_config=config)
    t, h, w = prompt.vision_grids[0].tolist()
    pads = int((prompt.tokens == tok.vision.image_pad).sum())
    assert pads == h * w // 4 and prompt.pixel_values.shape[0] == t * h * w
    text = tok.decode(prompt.tokens.tolist())
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    # the image block adds max(h, w)/2 positions, not its token count
    assert int(prompt.position_ids.max()) + 1 < prompt.tokens.numel()
    with pytest.raises(ValueError, match="--image"):
        build_prompt("look: <|image_pad|>", tokenizer=tok)


def test_cli_refuses_a_missing_checkpoint(tmp_path, capsys):
    from megatron_keye.cli import main

    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
