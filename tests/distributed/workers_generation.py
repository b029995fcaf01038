"""Generation workers: the KV-cache sampler against a no-cache recompute reference, layouts,
stop tokens, seeds, and an HF export round trip (several cases per spawned world)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.distributed.workers import tiny_config

# Peaked distributions (init std 0.1) so greedy choices are far from ties; a vocabulary that is
# not a multiple of 128, so padded logit columns are present and must never be chosen.
MODEL = ("model.init_std=0.1", "model.vocab_size=2000", "model.attention_backend=sdpa")
VISION = ("model.vision.flavor=tiny",)


def gen_config(layout: dict, *, vision: bool = False):
    return tiny_config(layout, extra=(*MODEL, *(VISION if vision else ())))


def text_prompts(seed: int = 11) -> list:
    """Three prompts of different lengths (left padding differs per row)."""
    from megatron_keye.post_training.generation import Prompt

    g = torch.Generator().manual_seed(seed)
    return [Prompt(tokens=torch.randint(0, 1280, (n,), generator=g)) for n in (7, 12, 4)]


def vision_prompts() -> list:
    """Two chat prompts through the front end: one with an image, one text only."""
    from megatron_keye.data.media.image import ImageConfig
    from megatron_keye.data.media.synthetic_media import synthetic_image
    from megatron_keye.data.text.tokenizer import KeyeTokenizer
    from megatron_keye.post_training.prompts import build_prompt

    tok = KeyeTokenizer.default()
    config = ImageConfig(min_pixels=4 * 784, max_pixels=12 * 784)
    image = synthetic_image(56, 84, seed=3)
    return [build_prompt("What is in the picture?", tokenizer=tok, images=[image],
                         image_config=config),
            build_prompt("Hello there.", tokenizer=tok)]


# ------------------------------------------------------------------------ no-cache reference
@torch.no_grad()
def recompute_reference(chunk, prompts: list, *, steps: int, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int = 0, samples: int = 1,
                        stop_ids: tuple = (), vocab_size: int) -> dict:
    """Each row alone, the whole sequence re-run every step (TP=PP=1): tokens and log-probs.

    Sampling is written out here from the formulas (softmax of logits/T, the smallest set of
    most likely tokens reaching top_p, the row's uniform draw inverted on its cumulative mass).
    """
    from megatron_keye.post_training.sampling import row_generator

    chunk.eval()
    rows_tokens, rows_logprobs = [], []
    for p_index, prompt in enumerate(prompts):
        for s in range(samples):
            row = p_index * samples + s
            generator = row_generator(seed, row)
            tokens = prompt.tokens.tolist()
            positions = prompt.positions().clone()
            next_pos = int(positions.max()) + 1
            out, logps = [], []
            for step in range(steps):
                ids = torch.tensor([tokens])
                pos = positions.unsqueeze(1)
                if prompt.vision_grids is not None:
                    logits = chunk(ids, pos, pixel_values=prompt.pixel_values,
                                   vision_grids=prompt.vision_grids)
                else:
                    logits = chunk(ids, pos)
                z = logits[-1, 0, :vocab_size].double()
                if temperature == 0.0:
                    token = int(z.argmax())
                    logp = F.log_softmax(z, -1)[token]
                else:
                    probs = F.softmax(z / temperature, -1)
                    ranked, order = probs.sort(descending=True, stable=True)
                    # the nucleus: most likely tokens until their mass reaches top_p
                    size = min(int((ranked.cumsum(0) < top_p).sum()) + 1, ranked.numel())
                    nucleus = ranked[:size]
                    u = float(torch.rand((), generator=generator, dtype=torch.float64))
                    # inverse CDF: the first token whose cumulative mass exceeds u * total
                    pick = int((nucleus.cumsum(0) <= u * float(nucleus.sum())).sum())
                    token = int(order[min(pick, size - 1)])
                    logp = F.log_softmax(z / temperature, -1)[token]
                out.append(token)
                logps.append(float(logp))
                if token in stop_ids:
                    break
                tokens.append(token)
                new = torch.full((3, 1), next_pos + step, dtype=torch.int64)
                positions = torch.cat([positions, new], dim=1)
            rows_tokens.append(out)
            rows_logprobs.append(logps)
    return {"tokens": rows_tokens, "logprobs": rows_logprobs}


def _rows(result) -> dict:
    n = result.tokens.size(0)
    return {"tokens": [result.row_tokens(r) for r in range(n)],
            "logprobs": [result.logprobs[r, : int(result.lengths[r])].tolist() for r in range(n)],
            "stopped": result.stopped.tolist(), "full": result.tokens.clone()}


def _build(config):
    import torch.distributed as dist

    from megatron_keye.models.keye_vl.builder import build_model_chunks
    from megatron_keye.runtime.parallel import ParallelDims, init_distributed

    init_distributed()
    ParallelDims.from_config(config.parallel, dist.get_world_size()).initialize(seed=config.seed)
    return build_model_chunks(config)


def _save(chunks, config, directory: str) -> None:
    from megatron_keye.config import config_to_dict
    from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState

    config.checkpoint.save_dir = directory
    layout = {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "context": 1, "data": 1}
    Checkpointer(config.checkpoint, run_config=config_to_dict(config), layout=layout).save(
        chunks=chunks, optimizer=None, state=TrainingState(iteration=1))


def _load(config, directory: str) -> list:
    from megatron_keye.config import config_to_dict
    from megatron_keye.runtime.checkpoint import Checkpointer

    chunks = _build(config)
    layout = {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "context": 1, "data": 1}
    Checkpointer(config.checkpoint, run_config=config_to_dict(config), layout=layout).load(
        directory, chunks=chunks, optimizer=None, weights_only=True)
    return chunks


SAMPLED = dict(temperature=0.8, top_p=0.9, seed=5)
STEPS = 6


def single_rank_worker(*, checkpoint_dir: str, hf_dir: str) -> dict:
    """TP=PP=1: cache vs reference (text model: greedy, sampled, seeds, stop tokens; vision
    model: image prompt), then the vision model saved, exported to HF, imported back and
    generating again, and transformers' Qwen3ForCausalLM on the exported language model."""
    from megatron_keye.post_training.generation import GenerationOptions, generate

    out: dict = {}
    greedy_options = GenerationOptions(max_new_tokens=STEPS)
    sampled_options = GenerationOptions(max_new_tokens=STEPS, samples_per_prompt=2, **SAMPLED)
    config = gen_config({})
    chunks = _build(config)
    vocab = config.model.vocab_size
    prompts = text_prompts()
    out["greedy"] = _rows(generate(chunks, prompts, greedy_options, pad_id=0))
    out["greedy_ref"] = recompute_reference(chunks[0], prompts, steps=STEPS, vocab_size=vocab)
    out["sampled"] = _rows(generate(chunks, prompts, sampled_options, pad_id=0))
    out["sampled_again"] = _rows(generate(chunks, prompts, sampled_options, pad_id=0))
    # the lean decode step against the modules for every step (must be bit-identical)
    from megatron_keye.post_training import lean_decode

    out["lean_unsupported"] = lean_decode.unsupported(chunks[0])
    out["greedy_modules"] = _rows(generate(chunks, prompts, greedy_options, pad_id=0, lean=False))
    out["sampled_modules"] = _rows(generate(chunks, prompts, sampled_options, pad_id=0,
                                            lean=False))
    out["sampled_ref"] = recompute_reference(chunks[0], prompts, steps=STEPS, samples=2,
                                             vocab_size=vocab, **SAMPLED)
    other = GenerationOptions(max_new_tokens=STEPS, samples_per_prompt=2,
                              **{**SAMPLED, "seed": 6})
    out["sampled_other_seed"] = _rows(generate(chunks, prompts, other, pad_id=0))
    # Stop on row 0's third greedy token: every row ends at its first occurrence of it.
    stop = out["greedy"]["tokens"][0][2]
    out["stop_token"] = stop
    stopped = generate(chunks, prompts, GenerationOptions(max_new_tokens=STEPS,
                                                          stop_token_ids=(stop,)), pad_id=0)
    out["stopped"] = _rows(stopped)

    # The vision model: an image prompt through the front end, M-RoPE decode positions.
    vconfig = gen_config({}, vision=True)
    vchunks = _build(vconfig)
    _save(vchunks, vconfig, checkpoint_dir)
    vprompts = vision_prompts()
    out["vision"] = _rows(generate(vchunks, vprompts, greedy_options, pad_id=0))
    out["vision_ref"] = recompute_reference(vchunks[0], vprompts, steps=STEPS, vocab_size=vocab)
    voptions = GenerationOptions(max_new_tokens=STEPS, **SAMPLED)
    out["vision_sampled"] = _rows(generate(vchunks, vprompts, voptions, pad_id=0))
    out["vision_sampled_modules"] = _rows(generate(vchunks, vprompts, voptions, pad_id=0,
                                                   lean=False))
    out["vision_sampled_ref"] = recompute_reference(vchunks[0], vprompts, steps=STEPS,
                                                    vocab_size=vocab, **SAMPLED)
    # Text prompts on the vision model: the TP=1 baseline of the layouts world.
    out["vl_text"] = _rows(generate(vchunks, prompts, greedy_options, pad_id=0))
    out["vl_text_sampled"] = _rows(generate(vchunks, prompts, sampled_options, pad_id=0))

    # The full Keye-VL HF export (this process is a world of one), imported back.
    from megatron_keye.convert import export_hf, import_hf

    export_hf(checkpoint_dir, hf_dir)
    import_hf(hf_dir, hf_dir + "-native")
    vchunks = _load(gen_config({}, vision=True), hf_dir + "-native")
    out["vision_reimported"] = _rows(generate(vchunks, vprompts, greedy_options, pad_id=0))
    out["vl_text_reimported"] = _rows(generate(vchunks, prompts, greedy_options, pad_id=0))
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf_tokens = []
    for prompt in prompts:
        ids = prompt.tokens.view(1, -1)
        with torch.no_grad():
            full = hf.generate(ids, max_new_tokens=STEPS, do_sample=False, use_cache=True)
        hf_tokens.append(full[0, ids.size(1):].tolist())
    out["transformers"] = hf_tokens

    # The CLI as one rank of a launcher's world: an image file and the chat template.
    import contextlib
    import io
    import json

    from megatron_keye.data.media.synthetic_media import image_bytes, synthetic_image
    from megatron_keye.post_training.generate_cli import main as generate_main

    image_path = hf_dir + "-image.png"
    with open(image_path, "wb") as f:
        f.write(image_bytes(synthetic_image(56, 84, seed=3)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate_main(["--checkpoint", checkpoint_dir, "--prompt", "What is in the picture?",
                       "--image", image_path, "--max-new-tokens", str(STEPS), "--json"])
    out["cli"] = [json.loads(line) for line in printed.getvalue().splitlines()]
    return out


def layouts_worker(*, cases: list[dict], checkpoint_dir: str) -> dict:
    """The CLI's rank function at several layouts of one world (each rank returns all rows)."""
    from megatron_keye.post_training import lean_decode
    from megatron_keye.post_training.generate_cli import generate_rank
    from megatron_keye.post_training.generation import GenerationOptions

    out = {}
    supported = lean_decode.unsupported
    for case in cases:
        prompts = vision_prompts() if case["vision"] else text_prompts()
        options = GenerationOptions(max_new_tokens=STEPS, **case.get("sampling", {}),
                                    samples_per_prompt=case.get("samples", 1))
        if case.get("modules"):  # every decode step through the modules
            lean_decode.unsupported = lambda module: "test: modules only"
        try:
            result = generate_rank(checkpoint=checkpoint_dir,
                                   prompts=prompts, options=options, tensor=case["tensor"],
                                   pipeline=case["pipeline"], pad_id=0,
                                   virtual_pipeline=case.get("virtual_pipeline", 1))
        finally:
            lean_decode.unsupported = supported
        out[case["name"]] = _rows(result)
    return out
