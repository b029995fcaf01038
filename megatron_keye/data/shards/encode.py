"""A shard record → the samples a row packs: template, media decoding, placeholder expansion.

Runs in loader workers (single-threaded torch). `templates.render_record` turns the record into
ChatML token ids with assistant-only target masks and one placeholder per media item (two
sequences for a preference pair); each media item it references is decoded here (images:
smart-resize and patch rows; videos: frame sampling, SlowFast classification and the token
budget), its placeholder is expanded to the item's tokens, and the result is a `PackUnit` of
`VisionSample`s (`data/vision_batch.py`) whose M-RoPE ids and labels the row builder derives.
Everything is a function of (record, its companions, seed, sample index): re-encoding a sample
restored from a checkpoint gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_keye.data.media.image import ImageConfig, preprocess_image
from megatron_keye.data.media.video_config import VideoConfig
from megatron_keye.data.media.video_pipeline import (
    load_video,
    video_pixel_values,
    video_placeholder_tokens,
)
from megatron_keye.data.shards.format import KIND_CAPTION, MEDIA_VIDEO, Record
from megatron_keye.data.shards.packing import PackUnit
from megatron_keye.data.shards.row_stream import BAD_MEDIA, BAD_RECORD, SampleSkip
from megatron_keye.data.text.templates import TemplateOptions, expand_rendered, render_record
from megatron_keye.data.vision_batch import VisionMedia, VisionSample


@dataclass(frozen=True, kw_only=True)
class EncoderSettings:
    """How records become samples (picklable; each worker builds its `RecordEncoder`)."""

    tokenizer: str | None = None  # tokenizer directory; None = the shipped one
    seed: int = 1234
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=lambda: VideoConfig(decode_threads=1))
    template: TemplateOptions = field(default_factory=TemplateOptions)
    companions: int = 2  # caption records offered to multi-image / trap caption tasks

    def __call__(self) -> RecordEncoder:
        return RecordEncoder(self)


class RecordEncoder:
    """Encodes records with one tokenizer and the media settings (one per worker process)."""

    def __init__(self, settings: EncoderSettings):
        from megatron_keye.data.text.tokenizer import KeyeTokenizer

        self.settings = settings
        self.tokenizer = (KeyeTokenizer.from_dir(settings.tokenizer) if settings.tokenizer
                          else KeyeTokenizer.default())
        self.companions = settings.companions

    def wants_companions(self, record: Record) -> bool:
        return record.kind == KIND_CAPTION and self.companions > 0

    def __call__(self, record: Record, *, sample_index: int,
                 companions: tuple[Record, ...] = ()) -> PackUnit:
        try:
            rendered = render_record(record, tokenizer=self.tokenizer, seed=self.settings.seed,
                                     sample_index=sample_index, options=self.settings.template,
                                     companions=companions)
        except ValueError as error:
            raise SampleSkip(BAD_RECORD, str(error)) from None
        records = (record, *companions)
        decoded: dict[tuple[int, int], tuple[VisionMedia, list[int]]] = {}
        samples, roles = [], []
        for sequence in rendered:
            media, media_tokens = [], []
            for ref in sequence.media:
                slot = (ref.record, ref.index)
                if slot not in decoded:
                    decoded[slot] = self._decode(records[ref.record], ref.index)
                media.append(decoded[slot][0])
                media_tokens.append(decoded[slot][1])
            tokens, targets = expand_rendered(sequence, media_tokens, ids=self.tokenizer.vision)
            samples.append(VisionSample(tokens=tokens, media=tuple(media), target_mask=targets,
                                        key=record.key))
            roles.append(sequence.pair_role)
        return PackUnit(samples=tuple(samples), roles=tuple(roles))

    def _decode(self, record: Record, index: int) -> tuple[VisionMedia, list[int]]:
        """One media item as (patch rows + grids, the tokens its placeholder becomes)."""
        item = record.media[index]
        name = f"{record.key}.{item.member}"
        try:
            if item.type == MEDIA_VIDEO:
                video = load_video(item.data, config=self.settings.video, key=name)
                pixels, grids = video_pixel_values(video, image_config=self.settings.image)
                return (VisionMedia.video(pixels, grids),
                        video_placeholder_tokens(video, self.tokenizer))
            image = preprocess_image(item.data, config=self.settings.image, key=name)
        except Exception as error:  # noqa: BLE001 - any decoder failure is a counted skip
            raise SampleSkip(BAD_MEDIA, f"{item.type} {name} cannot be decoded: "
                                        f"{type(error).__name__}: {error}") from None
        pad = self.tokenizer.vision.image_pad
        return VisionMedia.image(image.pixel_values, image.grid_thw), [pad] * image.num_tokens
