"""Workers and shared inputs for the vision tower + projector tests.

`vision_case` rebuilds the test batch deterministically (two images of different sizes and a
video with slow and fast frames, one grid row with t = 2), `full_vision_weights` draws every
tensor of the tower and projector (biases and norms included) in full TP=1 shapes, and
`vision_worker` runs the production modules on one rank of a spawned gloo world for one or more
layouts, returning outputs and full gradients (tensor-parallel pieces gathered).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LM_HIDDEN = 40
# (t, h, w) in patch units: image 6x8, image 10x4, then a video: slow 6x6, fast 2x4,
# two slow 6x6 frames in one t=2 row, fast 2x4 (the tiny table is 6x6: up- and down-sampled).
GRIDS = [[1, 6, 8], [1, 10, 4], [1, 6, 6], [1, 2, 4], [2, 6, 6], [1, 2, 4]]


def vision_config(recompute: str = "none"):
    from megatron_keye.config.schema import VisionConfig

    return VisionConfig.from_flavor("tiny", recompute=recompute)


def vision_case(seed: int = 0) -> dict:
    """pixel_values [P, 3, 14, 14], grids [n, 3], cotangents for features and embeddings, and a
    copy of the pixels with item 0 (the first image) replaced."""
    vc = vision_config()
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor(GRIDS)
    patches = int(grids.prod(1).sum())
    pixels = torch.randn(patches, vc.num_channels, vc.patch_size, vc.patch_size, generator=g)
    first = int(grids[0].prod())
    perturbed = pixels.clone()
    perturbed[:first] = torch.randn(first, *pixels.shape[1:], generator=g)
    # Tower alone on an odd patch count (grids the projector would refuse): under sequence
    # parallelism the packed sequence is padded to a multiple of the TP degree.
    odd_grids = torch.tensor([[1, 3, 5], [1, 2, 3]])
    odd = int(odd_grids.prod(1).sum())
    return {
        "odd_pixel_values": torch.randn(odd, *pixels.shape[1:], generator=g),
        "odd_grids": odd_grids, "odd_feature_grad": torch.randn(odd, vc.hidden_size, generator=g),
        "pixel_values": pixels, "grids": grids, "perturbed": perturbed,
        "feature_grad": torch.randn(patches, vc.hidden_size, generator=g),
        "embedding_grad": torch.randn(patches // 4, LM_HIDDEN, generator=g),
    }


def full_vision_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random full (TP=1) tensors for every parameter, keyed `tower.<name>` / `projector.<name>`.

    Norm scales are drawn around 1, everything else around 0; biases are non-zero so a bias
    added on the wrong side of a tensor-parallel reduction shows.
    """
    vc = vision_config()
    h, f, c, p = vc.hidden_size, vc.ffn_hidden_size, vc.num_channels, vc.patch_size
    shapes = {
        "tower.patch_embedding.weight": (h, c, p, p),
        "tower.patch_embedding.bias": (h,),
        "tower.position_embedding.weight": (vc.position_grid**2, h),
        "tower.encoder.final_layernorm.weight": (h,),
        "tower.encoder.final_layernorm.bias": (h,),
        "projector.pre_norm.weight": (4 * h,),
        "projector.pre_norm.bias": (4 * h,),
        "projector.linear_1.weight": (4 * h, 4 * h),
        "projector.linear_1.bias": (4 * h,),
        "projector.linear_2.weight": (LM_HIDDEN, 4 * h),
        "projector.linear_2.bias": (LM_HIDDEN,),
    }
    for i in range(vc.num_layers):
        layer = f"tower.encoder.layers.{i}."
        shapes.update({
            layer + "input_layernorm.weight": (h,),
            layer + "input_layernorm.bias": (h,),
            layer + "self_attention.linear_qkv.weight": (3 * h, h),
            layer + "self_attention.linear_qkv.bias": (3 * h,),
            layer + "self_attention.linear_proj.weight": (h, h),
            layer + "self_attention.linear_proj.bias": (h,),
            layer + "pre_mlp_layernorm.weight": (h,),
            layer + "pre_mlp_layernorm.bias": (h,),
            layer + "mlp.linear_fc1.weight": (f, h),
            layer + "mlp.linear_fc1.bias": (f,),
            layer + "mlp.linear_fc2.weight": (h, f),
            layer + "mlp.linear_fc2.bias": (h,),
        })
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        fan_in = shape[1] if len(shape) == 2 else (c * p * p if "patch" in name else 1)
        scale = 0.5 if len(shape) < 2 else fan_in**-0.5
        value = torch.randn(*shape, generator=g) * scale
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * value
        if name == "tower.position_embedding.weight":
            value = value * 0.3
        out[name] = value
    return out


def _build(parallel, weights: dict, recompute: str = "none"):
    from megatron_keye.models.keye_vl.projector import Projector
    from megatron_keye.models.keye_vl.vision import VisionTower

    vc = vision_config(recompute)
    tower = VisionTower(vc, parallel=parallel, attention_backend="sdpa")
    projector = Projector(vc, lm_hidden_size=LM_HIDDEN, parallel=parallel)
    _load(tower, "tower.", weights)
    _load(projector, "projector.", weights)
    return tower, projector


@torch.no_grad()
def _load(module, prefix: str, weights: dict) -> None:
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    names = {n for n in weights if n.startswith(prefix)}
    for name, param in module.named_parameters():
        full = weights[prefix + name]
        names.discard(prefix + name)
        dim = module.tensor_parallel_dim(name)
        piece = full if dim is None else full.chunk(size, dim=dim)[rank]
        if piece.shape != param.shape:
            raise ValueError(f"{prefix}{name}: {tuple(piece.shape)} vs {tuple(param.shape)}")
        param.copy_(piece)
    if names:
        raise KeyError(f"weights not used by the model: {sorted(names)}")


def _full_grads(module, prefix: str) -> dict[str, torch.Tensor]:
    """Gradients after finalize_model_grads' TP step, tensor-parallel pieces gathered."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, param in module.named_parameters():
        grad = param.grad.clone()
        if getattr(param, "sequence_parallel", False):  # what finalize_model_grads sums
            dist.all_reduce(grad, group=group)
        dim = module.tensor_parallel_dim(name)
        if dim is not None and size > 1:
            pieces = [torch.empty_like(grad) for _ in range(size)]
            dist.all_gather(pieces, grad.contiguous(), group=group)
            grad = torch.cat(pieces, dim=dim)
        out[prefix + name] = grad
    return out


def run_layout(parallel, case: dict, weights: dict, recompute: str = "none") -> dict:
    """Outputs (batch and perturbed batch), the loss, full gradients and the bytes autograd
    saves in the forward of one layout (and `vision.recompute` mode) on this rank."""
    from megatron_keye.planning.measure import SavedTensorCounter

    tower, projector = _build(parallel, weights, recompute)
    pixels, grids = case["pixel_values"], case["grids"]
    params = [*tower.parameters(), *projector.parameters()]
    with SavedTensorCounter(exclude=params) as saved:
        features = tower(pixels, grids)
        embeddings = projector(features, grids)
        loss = (features * case["feature_grad"]).sum() + (embeddings * case["embedding_grad"]).sum()
    loss.backward()
    grads = {**_full_grads(tower, "tower."), **_full_grads(projector, "projector.")}
    with torch.no_grad():
        perturbed_features = tower(case["perturbed"], grids)
        perturbed_embeddings = projector(perturbed_features, grids)
    no_grids = torch.zeros(0, 3, dtype=torch.int64)  # a batch without images or videos
    empty = projector(tower(pixels[:0], no_grids), no_grids)
    odd_pixels = case["odd_pixel_values"].clone().requires_grad_(True)
    odd_features = tower(odd_pixels, case["odd_grids"])
    (odd_features * case["odd_feature_grad"]).sum().backward()
    return {"loss": loss.detach(), "saved_bytes": saved.total_bytes,
            "empty_shape": tuple(empty.shape), "odd_features": odd_features.detach(), "odd_pixel_grad": odd_pixels.grad,
            "features": features.detach(), "embeddings": embeddings.detach(), "grads": grads,
            "perturbed_features": perturbed_features, "perturbed_embeddings": perturbed_embeddings}


def vision_worker(*, layouts: list[dict], case: dict, weights: dict) -> dict:
    """Every layout ({"tensor": n, "sequence_parallel": b, "recompute": none|full}) in turn on
    this rank of one world; parallel state is rebuilt between layouts of different TP degrees."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_keye.config.schema import ParallelConfig
    from megatron_keye.runtime.parallel import init_distributed

    init_distributed()
    results, current = {}, None
    for layout in layouts:
        tp = layout["tensor"]
        if tp != current:
            if current is not None:
                parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
            tensor_parallel.model_parallel_cuda_manual_seed(0)
            current = tp
        parallel = ParallelConfig(tensor=tp, sequence_parallel=layout.get("sequence_parallel", False))
        results[layout["name"]] = run_layout(parallel, case, weights,
                                             layout.get("recompute", "none"))
        if layout.get("recompute", "none") == "none":  # the init does not depend on recompute
            results[layout["name"]]["init"] = initial_weights(parallel)
    return results


def initial_weights(parallel) -> dict[str, torch.Tensor]:
    """Full weights after the per-name init (`initialize_vision_by_name`), pieces gathered."""
    from megatron.core import parallel_state

    from megatron_keye.models.keye_vl.builder import initialize_vision_by_name
    from megatron_keye.models.keye_vl.projector import Projector
    from megatron_keye.models.keye_vl.vision import VisionTower

    vc = vision_config()
    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for prefix, module in (("vision.", VisionTower(vc, parallel=parallel)),
                           ("projector.", Projector(vc, lm_hidden_size=LM_HIDDEN,
                                                    parallel=parallel))):
        initialize_vision_by_name(module, prefix=prefix, seed=7)
        for name, param in module.named_parameters():
            dim = module.tensor_parallel_dim(name)
            value = param.detach()
            if dim is not None and size > 1:
                pieces = [torch.empty_like(value) for _ in range(size)]
                dist.all_gather(pieces, value.contiguous(), group=group)
                value = torch.cat(pieces, dim=dim)
            out[prefix + name] = value
    return out
