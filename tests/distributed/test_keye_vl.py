"""Keye-VL end to end on the parallel runtime: every layout equals one process (fp32, rel 1e-5),
gradients of the vision tower and projector included; a batch without images; a pad-count
mismatch names the row; stage-1 freezing trains the projector only.

The batch is built by the front end (image pipeline, vision tokens, tokenizer) from synthetic
media: two images of different sizes and a video with slow and fast frames, in two rows. One
spawned world per world size runs all of its cases: the 4-rank world runs the layouts and the
HF imports at TP=2 x PP=2, the 1-rank world the reference, the one-process checks and the HF
exports.
"""

from __future__ import annotations

import pytest
import torch

from megatron_keye.models.keye_vl.hf_adapter import hf_to_native, split_tensor
from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers_keye_vl import (
    demo_batch,
    four_rank_worker,
    random_hf_state,
    single_process_worker,
    text_batch,
    vl_config,
)

TOLERANCE = 1e-5
VISION_PREFIXES = ("vision.", "projector.")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def doubled(batch: dict) -> dict:
    """The batch twice over (4 rows): the same mean loss and gradients, for DP=2 x 2 micro-batches."""
    out = {}
    for key, value in batch.items():
        out[key] = torch.cat([value, value], dim=1 if key == "position_ids" else 0)
    return out


@pytest.fixture(scope="module")
def setup():
    config = vl_config({})
    hf = random_hf_state(config.model)
    weights = {k: v.clone() for k, v in hf_to_native(hf, config.model).items()}
    return {"config": config, "hf": hf, "weights": weights, "batch": demo_batch()}


@pytest.fixture(scope="module")
def hf_dirs(setup, tmp_path_factory):
    """A Keye-VL HF directory of the setup's weights, and the stage-1 sources: its language
    model alone (a Qwen3 directory) and a random transformers SiglipVisionModel directory."""
    import dataclasses

    from transformers import SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("keye_hf")
    model = setup["config"].model
    _write_hf_dir(root / "source", model, setup["hf"])
    lm = {k: v for k, v in setup["hf"].items() if k.startswith(("model.", "lm_head."))}
    _write_hf_dir(root / "qwen3", dataclasses.replace(model, vision=None), lm)
    vc = model.vision
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=vc.hidden_size, intermediate_size=vc.ffn_hidden_size,
        num_hidden_layers=vc.num_layers, num_attention_heads=vc.num_attention_heads,
        image_size=vc.position_grid * vc.patch_size, patch_size=vc.patch_size))
    tower.save_pretrained(str(root / "siglip"))
    return {"root": root, "lm": lm, "siglip": tower.state_dict()}


@pytest.fixture(scope="module")
def world4(setup, hf_dirs):
    """The layout cases, then the HF imports at TP=2 x PP=2, in one 4-rank world."""
    root = hf_dirs["root"]
    batches = {name: doubled(setup["batch"]) if name == "pp2_vpp2_dp2" else setup["batch"]
               for name in CASES}
    imports = [
        (str(root / "source"), str(root / "native"), {"tensor": 2, "pipeline": 2}),
        (str(root / "qwen3"), str(root / "stage1"),
         {"tensor": 2, "pipeline": 2, "vision_dir": str(root / "siglip")}),
    ]
    per_rank = run_workers(four_rank_worker, 4, cases=CASES, weights=setup["weights"],
                           batches=batches, imports=imports, timeout=600)
    return {name: [r[name] for r in per_rank] for name in CASES}


@pytest.fixture(scope="module")
def single(setup, hf_dirs, world4):
    root = hf_dirs["root"]
    exports = [(str(root / "native"), str(root / "export"), str(root / "source")),
               (str(root / "stage1"), str(root / "stage1_hf"), None)]
    (result,) = run_workers(single_process_worker, 1, weights=setup["weights"],
                            batch=setup["batch"], mismatch=demo_batch(drop_pad_in_row=0),
                            text=text_batch(), exports=exports)
    return result


def test_batch_has_images_and_slow_fast_video(setup):
    grids = setup["batch"]["vision_grids"].tolist()
    assert grids[:2] == [[1, 4, 6], [1, 2, 4]]  # two images of different sizes
    assert grids[2:] == [[1, 4, 4], [1, 2, 2], [1, 4, 4], [1, 2, 2]]  # slow, fast, slow, fast
    # Row 0's image pads straddle the boundary of the first CP=2 chunk.
    tokens = setup["batch"]["tokens"][0]
    pads = (tokens == setup["config"].model.image_token_id).nonzero().flatten()
    assert pads.min() < 16 <= pads.max()


def test_reference_has_vision_gradients(single):
    grads = single["reference"]["grads"]
    vision = [k for k in grads if k.startswith(VISION_PREFIXES)]
    assert any(k.startswith("vision.encoder.layers.") for k in vision)
    assert any(k.startswith("projector.") for k in vision)
    for key in vision:
        assert grads[key].norm() > 0, key


def test_batch_without_images_trains(single):
    result = single["text_only"]
    assert result["count"] > 0 and torch.isfinite(torch.tensor(result["loss"]))
    for key, grad in result["grads"].items():
        if key.startswith(VISION_PREFIXES):
            assert torch.count_nonzero(grad) == 0, key
        elif key.startswith("decoder.layers.0."):
            assert grad.norm() > 0, key


def test_pad_count_mismatch_names_the_row(single):
    message = single["mismatch_error"]
    assert "batch row 0" in message and "vision item 0" in message


def test_stage1_freezing_trains_the_projector_only(single):
    before, after = single["freeze"]["before"], single["freeze"]["after"]
    assert set(before) == set(after)
    for key in before:
        if key.startswith("projector."):
            assert not torch.equal(before[key], after[key]), f"{key} did not move"
        else:
            assert torch.equal(before[key], after[key]), f"{key} changed"


CASES = {
    "tp2_pp2": {"tensor": 2, "pipeline": 2},
    "cp2_tp2_sp": {"context": 2, "tensor": 2, "sp": True},
    # Row 0 (one image) on DP rank 0: one of its CP ranks encodes nothing, yet receives the
    # embeddings of the image pads in its chunk (and returns their gradients).
    "cp2_dp2": {"context": 2, "micro_batch": 1},
    "pp2_vpp2_dp2": {"pipeline": 2, "vpp": 2, "micro_batch": 1},
}


@pytest.mark.parametrize("name", list(CASES))
def test_layout_matches_single_process(name, world4, single):
    ref = single["reference"]
    covered = set()
    for r in world4[name]:
        assert abs(r["loss"] - ref["loss"]) / abs(ref["loss"]) < TOLERANCE
        for key, grad in r["grads"].items():
            if key.startswith(VISION_PREFIXES):
                assert r["pp_rank"] == 0, f"{key} lives on pipeline rank {r['pp_rank']}"
            expected = split_tensor(key, ref["grads"][key], r["tp_rank"], r["tp_size"])
            assert grad.shape == expected.shape, key
            err = relative_error(grad, expected)
            assert err < TOLERANCE, f"{name} rank {r['rank']} {key}: relative error {err:.2e}"
            covered.add(key)
    assert covered == set(ref["grads"]), "some parameters were held by no rank"


# --------------------------------------------------------------------------- HF conversion
def _write_hf_dir(path, model, tensors: dict) -> None:
    import json
    import shutil

    from safetensors.torch import save_file

    from megatron_keye.data.text.tokenizer import DEFAULT_TOKENIZER_DIR
    from megatron_keye.models.keye_vl.hf_adapter import hf_config_dict

    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**hf_config_dict(model),
                                                  "torch_dtype": "float32"}))
    for file in DEFAULT_TOKENIZER_DIR.iterdir():
        shutil.copy(file, path / file.name)


def _read_safetensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_hf_native_hf_is_bit_exact(setup, hf_dirs, single):
    """Keye-VL HF -> native at TP=2 x PP=2 -> HF (one process): every tensor bit-exact."""
    import json

    out = hf_dirs["root"] / "export"
    back = _read_safetensors(out)
    assert set(back) == set(setup["hf"])
    assert any(k.startswith("visual.vision_model.encoder.layers.") for k in back)
    assert any(k.startswith("mlp_AR.") for k in back)
    for name, tensor in setup["hf"].items():
        assert torch.equal(back[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    model = setup["config"].model
    assert config["architectures"] == ["KeyeVL1_5ForConditionalGeneration"]
    assert config["vocab_size"] == 2000 and back["model.embed_tokens.weight"].shape[0] == 2000
    assert config["image_token_id"] == model.image_token_id == 1289
    assert config["video_token_id"] == 1290 and config["vision_start_token_id"] == 1287
    assert config["rope_scaling"]["mrope_section"] == model.mrope_section
    vision = config["vision_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["patch_size"]) == (48, 2, 14)
    assert vision["image_size"] // vision["patch_size"] == model.vision.position_grid
    assert (out / "tokenizer.json").is_file()


def test_exported_language_model_loads_in_transformers(hf_dirs, single):
    """transformers' Qwen3ForCausalLM loads the exported directory as is: the native model's
    text-only logits within 1e-4."""
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(str(hf_dirs["root"] / "export"),
                                          attn_implementation="eager")
    tokens = text_batch()["tokens"]
    with torch.no_grad():
        logits = hf(tokens).logits.float()
    native = single["text_logits"][..., :2000]
    assert logits.shape == native.shape
    assert (logits - native).abs().max().item() < 1e-4


def test_import_qwen3_plus_siglip_tower(setup, hf_dirs, single):
    """Stage 1 starts from a Qwen3 LM directory and a SigLIP vision tower directory (imported
    at TP=2 x PP=2, exported by one process)."""
    import json

    model, vc = setup["config"].model, setup["config"].model.vision
    out = hf_dirs["root"] / "stage1_hf"
    back = _read_safetensors(out)
    for name, tensor in hf_dirs["lm"].items():
        assert torch.equal(back[name], tensor), name
    siglip = {k: v for k, v in hf_dirs["siglip"].items() if not k.startswith("head.")}
    for name, tensor in siglip.items():
        assert torch.equal(back["visual.vision_model." + name], tensor), name
    projector = {k: v for k, v in back.items() if k.startswith("mlp_AR.")}
    assert projector["mlp_AR.linear_2.weight"].shape == (model.hidden_size, vc.merged_size)
    assert projector["mlp_AR.linear_1.weight"].std() > 0  # freshly initialized, not zeros
    config = json.loads((out / "config.json").read_text())
    assert config["image_token_id"] == 1289  # from the LM directory's tokenizer
    assert config["vision_config"]["hidden_size"] == vc.hidden_size
