"""A text prompt with optional images and videos → a generation `Prompt` (tokens, M-RoPE ids,
patch rows), through the same front end as training data.

The user turn is rendered with the ChatML template (`data/text/templates.render_chat`, with the
assistant's generation prompt) unless `chat=False`; each image and video becomes a placeholder
ahead of the text, which is expanded to the item's tokens (`vision_tokens`), images with
`data/media/image.preprocess_image` and videos with the SlowFast pipeline
(`data/media/video_pipeline`). Position ids are `vision_tokens.mrope_position_ids` (spec §1.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_keye.data.media.image import TOKEN_PIXELS, ImageConfig, preprocess_image
from megatron_keye.data.media.video_config import VideoConfig
from megatron_keye.data.text.templates import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, render_chat
from megatron_keye.data.text.tokenizer import IMAGE_PAD, VIDEO_PAD, KeyeTokenizer
from megatron_keye.data.text.vision_tokens import expand_vision_placeholders, mrope_position_ids
from megatron_keye.post_training.generation import Prompt


def build_prompt(
    text: str,
    *,
    tokenizer: KeyeTokenizer,
    images: Sequence[str] = (),
    videos: Sequence[str] = (),
    chat: bool = True,
    image_config: ImageConfig | None = None,
    video_config: VideoConfig | None = None,
) -> Prompt:
    """The prompt for `text` with `images` and `videos` (file paths) before it."""
    if IMAGE_PAD in text or VIDEO_PAD in text:
        raise ValueError(f"--prompt: spells {IMAGE_PAD} or {VIDEO_PAD}; pass media with "
                         f"--image/--video instead")
    if chat:
        parts = ([{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
                 + [{"type": "text", "text": text}])
        rendered = render_chat([{"role": "user", "content": parts}], add_generation_prompt=True)
    else:
        rendered = IMAGE_PLACEHOLDER * len(images) + VIDEO_PLACEHOLDER * len(videos) + text
    ids = tokenizer.encode(rendered)
    pixels, image_grids, frame_grids, video_tokens = [], [], [], []
    for path in images:
        image = preprocess_image(path, config=image_config, key=str(path))
        pixels.append(image.pixel_values.float())
        image_grids.append(list(image.grid_thw))
    for path in videos:
        from megatron_keye.data.media.video_pipeline import (
            load_video,
            video_pixel_values,
            video_placeholder_tokens,
        )

        video = load_video(path, config=video_config, key=str(path))
        rows, grids = video_pixel_values(video, image_config=image_config)
        pixels.append(rows.float())
        frame_grids.extend(grids.tolist())
        video_tokens.append(video_placeholder_tokens(video, tokenizer))
    tokens = expand_vision_placeholders(ids, image_grids=image_grids, video_frames=video_tokens,
                                        ids=tokenizer.vision)
    positions = mrope_position_ids(tokens, image_grids=image_grids, video_frame_grids=frame_grids,
                                   ids=tokenizer.vision)
    grids = image_grids + frame_grids
    return Prompt(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        position_ids=positions,
        pixel_values=torch.cat(pixels) if pixels else None,
        vision_grids=torch.tensor(grids, dtype=torch.int64).reshape(-1, 3) if grids else None,
    )


def media_configs(saved: dict):
    """Image and video budgets of the run that wrote the checkpoint (as its loader used)."""
    data = saved.get("data") or {}
    image = ImageConfig(max_pixels=max(int(data.get("image_max_tokens", 20480)), 4) * TOKEN_PIXELS)
    video = VideoConfig(total_pixels=int(data.get("video_max_tokens", 65536)) * TOKEN_PIXELS)
    return image, video
