"""Videos as users have them: a codec matrix of small clips with a frame-number stamp on each frame.

Every clip (`synthetic_media.codec_matrix`: H.264 with/without B-frames at 29.97 and 24 fps,
variable frame rate, a start offset, 90/180 degree rotation, odd sizes, 8- and 10-bit HEVC and
H.264, VP8, VP9, AV1, MPEG-4 part 2, MJPEG, MPEG-TS) is decoded by both readers and by
`backend: auto`. The stamps tell which source frame arrived; decord's pixels are the target wherever
decord delivers the right frames (they are what keye-vl-utils feeds the model).

EXPECTED records what was measured on this matrix and what `auto` must pick; the README's table
says the same.
"""

from __future__ import annotations

import av  # before decord: see video_backends._import_decord
import numpy as np
import pytest
import torch

from megatron_keye.data.media import video_backends
from megatron_keye.data.media.synthetic_media import (
    codec_matrix,
    phone_vfr_times,
    read_stamp,
    stamped_frame,
    write_stamped_clip,
)
from megatron_keye.data.media.video import VideoDecodeError, decode_video
from megatron_keye.data.media.video_backends import StreamInfo, choose_backend
from megatron_keye.data.media.video_config import VideoConfig

decord = pytest.importorskip("decord", reason="decord (extra `video`) is the pixel reference")

SPECS = {spec.name: spec for spec in codec_matrix()}
ALL_FRAMES = VideoConfig(fps=1000.0)  # fps = min(1000, video fps): every frame is sampled

# name -> (auto's reader, decord's frames when it seeks (sparse indices): "right" | "wrong" |
# "fails", PyAV's pixels equal to decord's on a full read: True | False | None (no reference)).
EXPECTED = {
    "h264": ("pyav", "right", True),
    "h264_bframes": ("pyav", "right", True),
    "h264_vfr": ("pyav", "right", True),
    "h264_offset": ("pyav", "right", True),
    "h264_rot90": ("pyav", "fails", None),
    "h264_rot180": ("pyav", "right", True),
    "h264_66x50": ("pyav", "right", True),
    "h264_open_gop": ("pyav", "wrong", True),
    "hevc": ("pyav", "wrong", True),  # x265 writes open GOPs by default
    "hevc_10bit": ("pyav", "wrong", False),  # right frames beat decord's pixels
    "hevc_10bit_closed_gop": ("decord", "right", False),
    "h264_10bit": ("decord", "right", False),
    "vp8": ("pyav", "right", True),
    "vp9": ("pyav", "right", True),
    "vp9_odd": ("decord", "right", False),
    "av1": ("pyav", "fails", None),
    "mpeg4": ("decord", "right", True),  # bit-exact here; decord by the report of +-2
    "mpeg4_odd": ("decord", "right", False),
    "mjpeg": ("pyav", "right", True),
    "mjpeg_odd": ("decord", "right", False),
    "mpeg2_ts": ("pyav", "wrong", None),
    "mpegts_bframes": ("pyav", "wrong", None),
}
# Sparse index patterns (every k-th frame from an offset): the readers seek between them.
PATTERNS = [list(range(offset, 40, step)) for step in (2, 3, 5, 7, 11) for offset in range(step)]
# Configs sampling every frame, about every third (8 fps of 24) and the default 2 fps.
CONFIGS = [ALL_FRAMES, VideoConfig(fps=8.0), VideoConfig()]


def test_expectations_cover_the_matrix():
    assert set(EXPECTED) == set(SPECS)


def _encoder_missing(codec: str) -> str | None:
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # UnknownCodecError
        return f"encoder {codec} is not in this PyAV's FFmpeg build"
    return None


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """name -> path of each clip of the matrix (or the reason it cannot be encoded here)."""
    root = tmp_path_factory.mktemp("codec-matrix")
    paths: dict[str, object] = {}
    for name, spec in SPECS.items():
        missing = _encoder_missing(spec.codec)
        paths[name] = missing or write_stamped_clip(root / f"{name}.{spec.container}", spec)
    return paths


def _clip(clips, name):
    path = clips[name]
    if isinstance(path, str):
        pytest.skip(path)
    return path


def _stamps(frames: torch.Tensor, rotation: int) -> list[int | None]:
    """Frame numbers read from [N, H, W, 3] upright frames of a clip rotated by `rotation`."""
    turns = rotation // 90
    return [read_stamp(np.rot90(frame.numpy(), -turns)) for frame in frames]


class DictSink:
    def __init__(self):
        self.frames = {}

    def put(self, slot, image):
        self.frames[slot] = image.clone()

    def has(self, slot):
        return slot in self.frames


def _read_all(backend: str, path) -> tuple[torch.Tensor, int]:
    reader = video_backends.open_reader(backend, path, threads=1)
    sink = DictSink()
    indices = list(range(reader.total_frames))
    reader.read_into(sink, indices)
    return torch.stack([sink.frames[i] for i in indices]), reader.total_frames


@pytest.mark.parametrize("number", [0, 1, 5, 37, 128, 255])
def test_stamp_reads_back(number):
    assert read_stamp(stamped_frame(number, height=48, width=64)) == number
    assert read_stamp(np.full((48, 64, 3), 128, dtype=np.uint8)) is None


def _read(reader, indices: list[int]) -> torch.Tensor:
    sink = DictSink()
    reader.read_into(sink, indices)
    return torch.stack([sink.frames[i] for i in range(len(indices))])


@pytest.mark.parametrize("name", list(SPECS))
def test_pyav_delivers_the_right_frames(clips, name):
    spec = SPECS[name]
    frames, total = _read_all("pyav", _clip(clips, name))
    assert total == spec.num_frames
    assert _stamps(frames, spec.rotation) == list(range(spec.num_frames))
    reader = video_backends.PyAVReader(clips[name], threads=2)
    for wanted in PATTERNS:
        assert _stamps(_read(reader, wanted), spec.rotation) == wanted


@pytest.mark.parametrize("name", list(SPECS))
def test_decord_frames_are_as_measured(clips, name):
    spec = SPECS[name]
    path = _clip(clips, name)
    _, decord_state, _ = EXPECTED[name]
    if decord_state == "fails":  # AV1: cannot open; quarter turns: malformed frame buffers
        with pytest.raises(Exception):  # noqa: B017 - decord raises its own error types
            _read_all("decord", path)
        return
    right = []
    for wanted in PATTERNS:
        reader = video_backends.DecordReader(path, threads=1)  # fresh: no position carried over
        right.append(_stamps(_read(reader, wanted), spec.rotation) == wanted)
    assert all(right) if decord_state == "right" else not all(right)


@pytest.mark.parametrize("name", [name for name in SPECS if EXPECTED[name][2] is not None])
def test_pyav_pixels_against_decords(clips, name):
    """Where decord's full read gives the right frames (not for rot90, AV1, MPEG-TS)."""
    spec = SPECS[name]
    path = _clip(clips, name)
    exact = EXPECTED[name][2]
    ours, _ = _read_all("pyav", path)
    theirs, _ = _read_all("decord", path)  # a full sequential read: right frames here
    assert _stamps(theirs, spec.rotation) == list(range(spec.num_frames))
    difference = (ours.int() - theirs.int()).abs()
    if exact:
        assert int(difference.max()) == 0
    else:  # the two FFmpeg builds convert differently; auto picks decord unless it misnumbers
        assert int(difference.max()) > 20


@pytest.mark.parametrize("name", list(SPECS))
def test_auto_gives_the_right_frames_with_decords_pixels(clips, name):
    spec = SPECS[name]
    path = _clip(clips, name)
    backend, decord_state, _ = EXPECTED[name]
    data = path.read_bytes()
    for config in CONFIGS:
        auto = decode_video(data, config=config, key=name)
        assert auto.backend == backend, auto.backend_reason
        stamps = _stamps(auto.frames.permute(0, 2, 3, 1), spec.rotation)
        assert stamps == auto.indices.tolist()
        if decord_state == "right":
            reference = decode_video(data, config=config.with_overrides(backend="decord"))
            assert torch.equal(auto.frames, reference.frames)
            assert torch.equal(auto.timestamps, reference.timestamps)
            assert torch.equal(auto.indices, reference.indices)


def test_rule_table():
    def info(**changes):
        values = dict(
            container="mov,mp4,m4a,3gp,3g2,mj2",
            codec="h264",
            pix_fmt="yuv420p",
            bit_depth=8,
            odd_subsampled=False,
            reorders=True,
        )
        values.update(changes)
        return StreamInfo(**values)

    cases = [
        (info(), None, "pyav"),
        (info(codec="hevc"), 90, "pyav"),
        (info(container="mpegts"), None, "pyav"),
        (info(container="mpegts", bit_depth=10), None, "pyav"),  # right frames first
        (info(container="mpeg", codec="mpeg2video", reorders=False), None, "pyav"),
        (info(codec="libdav1d"), None, "pyav"),
        (info(codec="hevc", pix_fmt="yuv420p10le", bit_depth=10, open_gop=True), 0, "pyav"),
        (info(codec="hevc", open_gop=True), None, "pyav"),
        (info(codec="hevc", pix_fmt="yuv420p10le", bit_depth=10), None, "decord"),
        (info(codec="hevc", pix_fmt="yuv420p10le", bit_depth=10), 180, "decord"),
        (info(codec="hevc", pix_fmt="yuv420p10le", bit_depth=10), 270, "pyav"),
        (info(codec="vp9", odd_subsampled=True), None, "decord"),
        (info(codec="mpeg4"), 0, "decord"),
        (info(codec="mjpeg", pix_fmt="yuvj420p"), None, "pyav"),
    ]
    for stream, rotation, expected in cases:
        assert choose_backend(stream, rotation)[0] == expected, (stream, rotation)


def test_stream_info_reads_depth_and_odd_chroma():
    def of(pix_fmt, width, height):
        return StreamInfo.of("x", "c", av.VideoFormat(pix_fmt, width, height), reorders=False)

    assert of("yuv420p10le", 64, 48).bit_depth == 10
    assert of("yuv420p", 64, 48).bit_depth == 8
    assert of("yuv420p", 65, 48).odd_subsampled and of("yuv420p", 64, 49).odd_subsampled
    assert of("yuv422p", 65, 48).odd_subsampled and not of("yuv422p", 64, 49).odd_subsampled
    assert not of("yuv444p", 65, 49).odd_subsampled
    assert not of("yuv420p", 66, 50).odd_subsampled


# ---- timestamps: index (released) or pts --------------------------------------------------------


def test_pts_timestamps_on_variable_frame_rate(clips):
    path = _clip(clips, "h264_vfr")
    truth = phone_vfr_times(SPECS["h264_vfr"].num_frames)
    for backend, tolerance in (("pyav", 1e-5), ("decord", 2e-4)):  # decord rounds to 0.1 ms
        config = ALL_FRAMES.with_overrides(backend=backend)
        by_index = decode_video(path, config=config)
        by_pts = decode_video(path, config=config.with_overrides(timestamps="pts"))
        assert torch.equal(by_pts.frames, by_index.frames)
        expected = torch.tensor([truth[i] for i in by_pts.indices.tolist()])
        assert torch.allclose(by_pts.timestamps.double(), expected.double(), atol=tolerance)
        # index / average fps drifts from the true times on this clip by > 50 ms
        assert float((by_index.timestamps - by_pts.timestamps).abs().max()) > 0.05
    assert VideoConfig().timestamps == "index"  # the released code's timestamps by default


def test_pts_timestamps_start_at_the_first_frame(clips):
    path = _clip(clips, "h264_offset")  # the video's first frame is at 1.5 s
    by_pts = decode_video(path, config=VideoConfig(timestamps="pts"))
    by_index = decode_video(path)
    assert torch.allclose(by_pts.timestamps, by_index.timestamps, atol=1e-5)
    assert by_pts.timestamps[0] == 0.0


def test_pts_trimming_uses_presentation_times(clips):
    path = _clip(clips, "h264_vfr")
    truth = phone_vfr_times(SPECS["h264_vfr"].num_frames)
    config = ALL_FRAMES.with_overrides(timestamps="pts")
    trimmed = decode_video(path, config=config, start=0.3, end=1.0)
    inside = [i for i, t in enumerate(truth) if 0.3 <= t <= 1.0]
    assert trimmed.indices.tolist()[0] == inside[0] and trimmed.indices.tolist()[-1] == inside[-1]
    assert all(0.3 - 1e-6 <= t <= 1.0 + 1e-6 for t in trimmed.timestamps.tolist())
    with pytest.raises(VideoDecodeError, match="vfr-clip: no frame lies"):
        decode_video(path, config=config, start=30.0, key="vfr-clip")


def test_timestamps_setting_is_validated():
    with pytest.raises(ValueError, match="timestamps must be 'index' or 'pts'"):
        VideoConfig(timestamps="seconds")


# ---- quiet logging: failures once, in our words -------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_broken_input_is_not_dumped_to_stderr(capfd, backend):
    marker = b"SECRET-PAYLOAD-0123456789"
    payload = b"not a video " + marker * 200
    config = VideoConfig(backend=backend)
    with pytest.raises(VideoDecodeError, match="shard-7/clip-42: cannot decode") as caught:
        decode_video(payload, config=config, key="shard-7/clip-42")
    captured = capfd.readouterr()
    assert marker.decode() not in captured.err and marker.decode() not in captured.out
    assert marker.decode() not in str(caught.value)
    assert len(str(caught.value)) < 400


@pytest.mark.timeout(60)
def test_damaged_clip_in_another_codec_fails_quietly(clips, capfd):
    data = bytearray(_clip(clips, "hevc").read_bytes())
    data[len(data) // 3 :] = bytes(len(data) - len(data) // 3)  # zero out two thirds
    try:
        decode_video(bytes(data), key="shard-1/hevc")
    except VideoDecodeError as error:
        assert "shard-1/hevc" in str(error)
    assert capfd.readouterr().err == ""


# ---- keye-vl-utils itself (decord underneath) on the clips where decord's frames are right -----


@pytest.mark.parametrize(
    "name", ["h264_bframes", "h264_vfr", "hevc_10bit_closed_gop", "vp9_odd", "mjpeg", "mpeg4_odd"]
)
def test_load_video_equals_fetch_video(clips, name):
    from megatron_keye.data.media.video_pipeline import load_video
    from tests.unit.test_video_oracle import keye_vision_process

    vision_process = keye_vision_process()
    data = _clip(clips, name).read_bytes()
    frames, kwargs = vision_process.fetch_video({"video": data, "fps": 8.0})
    ours = load_video(data, config=VideoConfig(fps=8.0), key=name)
    assert torch.equal(ours.frames, frames)
    assert torch.equal(ours.timestamps, kwargs["timestamps"])
    assert torch.equal(ours.frame_types, kwargs["frame_types"])
