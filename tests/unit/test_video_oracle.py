"""Our video front end against the released keye-vl-utils 1.5.2 (optional oracle).

keye-vl-utils, OpenCV and einops come with the `dev` extra that `make test` installs; where they
are missing these tests skip, and the rest of the suite still checks the same behaviour through
hand-computed tables and plain reference implementations.
"""

from __future__ import annotations

import pytest
import torch

from megatron_keye.data.media.synthetic_media import Scene, write_video
from megatron_keye.data.media.video_config import VideoConfig
from megatron_keye.data.media.video_pipeline import load_video
from megatron_keye.testing.keye_reference import import_vision_process


def keye_vision_process(*, decode: bool = True):
    """keye_vl_utils.vision_process, or a skip naming what is missing (a broken install too).

    `decode`: the test runs fetch_video's decord reader (the module imports decord only there).
    """
    for name in ("cv2", "einops", *(("decord",) if decode else ())):
        pytest.importorskip(name, exc_type=ImportError)
    try:
        return import_vision_process()
    except ImportError as error:
        pytest.skip(f"keye-vl-utils not importable: {error}")


@pytest.fixture(scope="module")
def vision_process():
    return keye_vision_process()


@pytest.fixture(scope="module")
def vision_process_without_decoding():
    """For tests that replace fetch_video's decord reader: decord need not be installed."""
    return keye_vision_process(decode=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("fps", "height", "width", "codec", "scenes"),
    [
        (4, 224, 320, "libx264", [(7, "static"), (9, "fade"), (5, "static"), (8, "pan")]),
        (30, 180, 320, "libx264", [(40, "static"), (35, "fade"), (30, "pan")]),
        (25, 240, 426, "mpeg4", [(30, "pan"), (30, "static")]),
    ],
)
def test_fetch_video_agrees(tmp_path, vision_process, fps, height, width, codec, scenes):
    path = tmp_path / "clip.mp4"
    write_video(
        path,
        scenes=[Scene(num_frames=n, seed=10 + i, motion=m) for i, (n, m) in enumerate(scenes)],
        fps=fps,
        height=height,
        width=width,
        codec=codec,
    )
    for threshold, config in ((0.9, VideoConfig.released()), (0.95, VideoConfig.paper())):
        frames, kwargs = vision_process.fetch_video(
            {
                "video": str(path),
                "min_frame_similarity": threshold,
                "video_total_pixels": config.total_pixels,
            }
        )
        for backend in ("decord", "pyav"):
            ours = load_video(path.read_bytes(), config=config.with_overrides(backend=backend))
            assert torch.equal(ours.frames, frames)
            assert torch.equal(ours.timestamps, kwargs["timestamps"])
            assert torch.equal(ours.frame_types, kwargs["frame_types"])
            budget = ours.budget
            assert (budget.slow_height, budget.slow_width) == (kwargs["height"], kwargs["width"])
            assert (budget.fast_height, budget.fast_width) == (
                kwargs["fast_height"],
                kwargs["fast_width"],
            )


def test_budget_agrees_with_reference_search(vision_process_without_decoding, monkeypatch):
    """Many (slow, fast, size) combinations through fetch_video's own budget arithmetic."""
    from megatron_keye.data.media.video_budget import solve_video_budget

    vision_process = vision_process_without_decoding

    sizes = [(720, 1280), (1080, 1920), (360, 640), (480, 480), (1920, 1080), (100, 3000)]
    counts = [(1, 0), (1, 119), (128, 0), (10, 300), (1, 1364), (60, 60), (400, 965), (700, 0)]
    for height, width in sizes:
        for num_slow, num_fast in counts:
            total = num_slow + num_fast
            # fetch_video reads only the shape of the frames: a stride-0 view is enough.
            frames = torch.zeros(1, 3, 1, 1, dtype=torch.uint8).expand(total, 3, height, width)
            types_ = torch.tensor([0] * num_slow + [1] * num_fast, dtype=torch.int32)
            monkeypatch.setattr(
                vision_process, "_read_video_decord", lambda ele, f=frames, t=types_: (f, None, t)
            )
            _, kwargs = vision_process.fetch_video({"video": "unused.mp4"})
            got = solve_video_budget(
                num_slow=num_slow, num_fast=num_fast, height=height, width=width
            )
            assert (got.slow_height, got.slow_width, got.fast_height, got.fast_width) == (
                kwargs["height"],
                kwargs["width"],
                kwargs["fast_height"],
                kwargs["fast_width"],
            ), (height, width, num_slow, num_fast)


def test_budget_oracle_needs_no_decord(monkeypatch):
    """The budget comparison must run where decord is missing (it never decodes)."""
    import sys

    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    with pytest.raises(pytest.skip.Exception, match="decord"):
        keye_vision_process()
    assert keye_vision_process(decode=False).fetch_video is not None
