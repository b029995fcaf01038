"""Video decoding: frame sampling arithmetic, decord/PyAV agreement, trimming and bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from megatron_keye.data.media import video_backends
from megatron_keye.data.media.synthetic_media import (
    Scene,
    scene_frame,
    write_empty_video,
    write_video,
)
from megatron_keye.data.media.video import (
    VideoDecodeError,
    decode_video,
    decord_available,
    frame_timestamps,
    open_video_stream,
    sample_frame_indices,
    smart_nframes,
)
from megatron_keye.data.media.video_config import VideoConfig

RELEASED = VideoConfig()
needs_decord = pytest.mark.skipif(not decord_available(), reason="decord is not installed")

# (total_frames, video_fps, config overrides) -> frames sampled
NFRAMES_CASES = [
    ((120, 30.0, {}), 8),  # fps min(2, 30) = 2: int(120/30*2) = 8
    ((100, 4.0, {}), 50),  # int(100/4*2) = 50
    ((10, 1.0, {}), 10),  # fps capped at the video's 1: int(10/1*1) = 10
    ((40000, 25.0, {}), 1365),  # int(40000/25*2) = 3200 > cap int(65536*784/37632) = 1365
    ((40000, 25.0, {"max_frames": 100}), 100),
    ((300, 30.0, {"fps": 0.5}), 5),  # int(300/30*0.5) = 5
    ((7, 30.0, {}), 1),  # int(7/30*2) = 0: the reference fails here, we keep one frame
    ((40000, 25.0, {"total_pixels": 75000 * 784}), 1562),  # paper budget: int(1562.5)
]


@pytest.mark.parametrize(("args", "expected"), NFRAMES_CASES)
def test_smart_nframes_table(args, expected):
    total, fps, overrides = args
    assert smart_nframes(total, fps, config=VideoConfig(**overrides)) == expected


def test_sample_indices_and_timestamps_by_hand():
    # 9 frames at 4 fps: int(9/4*2) = 4 frames, linspace(0, 8, 4) = 0, 2.67, 5.33, 8.
    indices = sample_frame_indices(9, 4.0, config=RELEASED)
    assert indices.tolist() == [0, 3, 5, 8]
    assert frame_timestamps(indices, 4.0).tolist() == [0.0, 0.75, 1.25, 2.0]
    # 10 frames: 5 samples at 0, 2.25, 4.5, 6.75, 9; round half to even sends 4.5 to 4.
    assert sample_frame_indices(10, 4.0, config=RELEASED).tolist() == [0, 2, 4, 7, 9]


def test_trimmed_sampling_by_hand():
    # 40 frames at 4 fps; [2 s, 6 s] holds frames 8..24 (17 frames): int(17/4*2) = 8 samples at
    # 8 + round(linspace(0, 16, 8)) = 8 + [0, 2, 5, 7, 9, 11, 14, 16].
    indices = sample_frame_indices(40, 4.0, config=RELEASED, start=2.0, end=6.0)
    assert indices.tolist() == [8, 10, 13, 15, 17, 19, 22, 24]
    assert frame_timestamps(indices, 4.0).tolist() == [2.0, 2.5, 3.25, 3.75, 4.25, 4.75, 5.5, 6.0]
    # start between frames: 2.1 s -> first frame 9 (2.25 s); end only: frames 0..4 (5 frames).
    assert sample_frame_indices(40, 4.0, config=RELEASED, start=2.1).tolist()[0] == 9
    assert sample_frame_indices(40, 4.0, config=RELEASED, end=1.0).tolist() == [0, 4]


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [(5.0, 4.0, "no frame lies"), (20.0, None, "no frame lies"), (-1.0, None, "start=-1.0")],
)
def test_bad_trim_is_refused_naming_the_video(start, end, message):
    with pytest.raises(VideoDecodeError, match=f"clip-7.*{message}"):
        sample_frame_indices(40, 4.0, config=RELEASED, start=start, end=end, name="clip-7")


SCENES = [
    Scene(num_frames=9, seed=1),
    Scene(num_frames=7, seed=2, motion="fade"),
    Scene(num_frames=8, seed=3, motion="pan"),
    Scene(num_frames=6, seed=4),
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {
        "h264": write_video(root / "h264.mp4", scenes=SCENES, fps=4),
        "h264_gop5": write_video(root / "gop5.mp4", scenes=SCENES, fps=12, gop=5),
        "mpeg4": write_video(root / "mpeg4.mp4", scenes=SCENES, fps=25, codec="mpeg4"),
        "bt709_full": write_video(
            root / "bt709.mp4", scenes=SCENES, fps=4, colorspace=1, color_range=2
        ),
    }


def test_decoded_frames_are_the_written_pictures(videos):
    info = videos["h264"]
    decoded = decode_video(info.path, config=RELEASED.with_overrides(backend="pyav"))
    # 30 frames at 4 fps: int(30/4*2) = 15 samples.
    assert decoded.num_frames == 15 and decoded.total_frames == 30 and decoded.video_fps == 4.0
    assert decoded.frames.dtype == torch.uint8 and decoded.frames.shape == (15, 3, 224, 320)
    assert decoded.indices.tolist() == torch.linspace(0, 29, 15).round().long().tolist()
    # crf 18 keeps the mosaics close to what was written (lossy: compare on average).
    for slot, index in enumerate(decoded.indices.tolist()):
        scene = max(i for i, s in enumerate(info.scene_starts) if s <= index)
        written = scene_frame(
            SCENES[scene], index - info.scene_starts[scene], height=224, width=320
        )
        got = decoded.frames[slot].permute(1, 2, 0).numpy().astype(np.int32)
        assert np.abs(got - written).mean() < 6


@needs_decord
@pytest.mark.parametrize("name", ["h264", "h264_gop5", "mpeg4", "bt709_full"])
def test_decord_and_pyav_agree_bit_exactly(videos, name):
    path = videos[name].path
    by_backend = {
        backend: decode_video(path, config=RELEASED.with_overrides(backend=backend))
        for backend in ("decord", "pyav")
    }
    from_bytes = decode_video(path.read_bytes(), config=RELEASED.with_overrides(backend="pyav"))
    reference = by_backend["decord"]
    for other in (by_backend["pyav"], from_bytes):
        assert torch.equal(other.frames, reference.frames)
        assert torch.equal(other.timestamps, reference.timestamps)
        assert torch.equal(other.indices, reference.indices)
        assert other.total_frames == reference.total_frames
        assert other.video_fps == reference.video_fps
    assert reference.backend == "decord" and by_backend["pyav"].backend == "pyav"


class DictSink:
    def __init__(self):
        self.frames = {}

    def put(self, slot, image):
        self.frames[slot] = image.clone()

    def has(self, slot):
        return slot in self.frames


@pytest.mark.parametrize("name", ["h264", "h264_gop5", "mpeg4"])
def test_pyav_skipping_unwanted_frames_changes_nothing(videos, name):
    """The non-reference-frame skip must give exactly the frames of a full decode."""
    reader = video_backends.PyAVReader(str(videos[name].path), threads=0)
    wanted = [0, 3, 4, 11, reader.total_frames - 1]
    full, skipped = DictSink(), DictSink()
    reader.decode_pass(full, wanted, skip_unwanted=False)
    decoded_in_full = reader.frames_decoded
    reader.decode_pass(skipped, wanted, skip_unwanted=True)
    assert sorted(full.frames) == sorted(skipped.frames) == list(range(len(wanted)))
    for slot in range(len(wanted)):
        assert torch.equal(full.frames[slot], skipped.frames[slot])
    if name.startswith("h264"):  # x264 writes non-reference B-frames: the skip saves work
        assert reader.frames_decoded < decoded_in_full


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_keyframe_segments_equal_one_sequential_pass(videos, threads):
    """Segments decoded from their keyframes, by up to 3 workers, give the sequential frames."""
    reader = video_backends.PyAVReader(str(videos["h264_gop5"].path), threads=threads)
    wanted = list(range(0, reader.total_frames, 3))
    assert len(reader.segments(wanted)) > 3  # keyframe every 5 frames
    parallel, sequential = DictSink(), DictSink()
    reader.read_into(parallel, wanted)
    reader.decode_pass(sequential, wanted, skip_unwanted=False)
    for slot in range(len(wanted)):
        assert torch.equal(parallel.frames[slot], sequential.frames[slot])


@needs_decord
def test_keyframe_segments_are_decords(videos):
    import decord

    for info in videos.values():
        reader = video_backends.PyAVReader(str(info.path), threads=1)
        keys = decord.VideoReader(str(info.path)).get_key_indices()
        assert reader._keyframes == list(keys)
        for index in range(reader.total_frames):
            expected = 0 if index <= keys[0] else max(k for k in keys if k <= index)
            assert reader.keyframe_position(index) == expected


@pytest.mark.timeout(30)
def test_decoder_failure_after_some_frames_reaches_the_reader(videos, monkeypatch):
    def fails_midway(self, sink, indices):
        frame = torch.zeros(224, 320, 3, dtype=torch.uint8)
        sink.put(0, frame)
        sink.put(1, frame)
        raise video_backends.BackendError("corrupt packet at frame 2")

    monkeypatch.setattr(video_backends.PyAVReader, "read_into", fails_midway)
    stream = open_video_stream(videos["h264"].path, config=RELEASED.with_overrides(backend="pyav"))
    assert stream.wait_for(2).shape[0] == stream.num_frames  # the first two are usable
    with pytest.raises(VideoDecodeError, match=r"h264.mp4: cannot decode.*corrupt packet"):
        stream.wait_for(3)
    with pytest.raises(VideoDecodeError, match="corrupt packet"):
        stream.result()


def test_auto_backend_and_trimming_on_a_file(videos):
    info = videos["h264"]
    decoded = decode_video(info.path, start=2.0, end=5.0)
    # frames 8..20 (13 frames): int(13/4*2) = 6 samples, 8 + round(linspace(0, 12, 6)).
    assert decoded.indices.tolist() == [8, 10, 13, 15, 18, 20]
    assert decoded.timestamps.tolist() == [2.0, 2.5, 3.25, 3.75, 4.5, 5.0]
    assert decoded.backend == "pyav"


@needs_decord
def test_auto_falls_back_to_decord_when_pyav_cannot_open(videos, monkeypatch):
    from megatron_keye.data.media import video, video_backends

    real_open_reader = video_backends.open_reader

    def pyav_broken(backend, source, *, threads):
        if backend == "pyav":
            raise RuntimeError("pyav refuses this input")
        return real_open_reader(backend, source, threads=threads)

    monkeypatch.setattr(video, "open_reader", pyav_broken)
    decoded = decode_video(videos["h264"].path)
    assert decoded.backend == "decord"
    monkeypatch.undo()
    expected = decode_video(videos["h264"].path, config=RELEASED.with_overrides(backend="pyav"))
    assert torch.equal(decoded.frames, expected.frames)
    monkeypatch.setattr(video, "open_reader", pyav_broken)
    monkeypatch.setattr(video, "decord_available", lambda: False)
    with pytest.raises(VideoDecodeError, match="pyav: RuntimeError: pyav refuses this input"):
        decode_video(videos["h264"].path)


@needs_decord
@pytest.mark.parametrize("rotation", [90, 180])
def test_rotated_video_is_upright_in_both_backends(tmp_path, rotation):
    import av

    path = tmp_path / "rotated.mp4"
    picture = np.zeros((48, 64, 3), dtype=np.uint8)
    picture[:16, :24] = (250, 250, 250)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=2, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(rotation)
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode(None))
    auto = decode_video(path)
    upright = np.rot90(picture, rotation // 90)
    assert auto.frames.shape[2:] == upright.shape[:2]
    bright = auto.frames[0].permute(1, 2, 0).numpy().astype(np.int32).mean(-1) > 128
    assert np.array_equal(bright, upright.mean(-1) > 128)
    if rotation == 180:
        decord = decode_video(path, config=RELEASED.with_overrides(backend="decord"))
        assert torch.equal(decord.frames, auto.frames)
    else:  # decord returns malformed frames for quarter turns (auto uses PyAV for H.264)
        assert auto.backend == "pyav"
        with pytest.raises(VideoDecodeError, match="decord"):
            decode_video(path, config=RELEASED.with_overrides(backend="decord"))


# ---- bad input: clear errors naming the input, never a hang -------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_truncated_files_fail_clearly(videos, tmp_path, backend):
    config = RELEASED.with_overrides(backend=backend)
    data = videos["h264"].path.read_bytes()  # index (moov) at the end: truncation loses it
    with pytest.raises(VideoDecodeError, match=r"<bytes len=\d+>: cannot decode"):
        decode_video(data[: len(data) // 2], config=config)
    faststart = write_video(tmp_path / "fast.mp4", scenes=SCENES, fps=4, faststart=True)
    data = faststart.path.read_bytes()  # index first: truncation loses frames
    for fraction in (0.3, 0.6, 0.9):
        with pytest.raises(VideoDecodeError, match="shard-000/k1.mp4: cannot decode"):
            decode_video(data[: int(len(data) * fraction)], config=config, key="shard-000/k1.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        decode_video(cut, config=config)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "payload", [b"this is not a video" * 20, bytes(range(256)) * 40, b"\x00" * 5000]
)
def test_non_video_bytes_fail_clearly(payload):
    with pytest.raises(VideoDecodeError, match="sample-9: cannot decode"):
        decode_video(payload, key="sample-9")


@pytest.mark.timeout(60)
def test_zero_frame_and_missing_inputs(tmp_path):
    empty = write_empty_video(tmp_path / "empty.mp4")
    with pytest.raises(VideoDecodeError, match="empty.mp4"):
        decode_video(empty)
    with pytest.raises(VideoDecodeError, match="empty input"):
        decode_video(b"")
    with pytest.raises(VideoDecodeError, match="no such file"):
        decode_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoDecodeError, match="expected a path or bytes"):
        decode_video(12345)
    not_video = tmp_path / "notes.txt"
    not_video.write_text("hello")
    with pytest.raises(VideoDecodeError, match="notes.txt"):
        decode_video(not_video)


@pytest.mark.timeout(30)
def test_a_decoder_that_never_returns_becomes_an_error(videos, monkeypatch):
    def stuck(self, sink, indices):
        time.sleep(10)

    monkeypatch.setattr(video_backends.PyAVReader, "read_into", stuck)
    config = RELEASED.with_overrides(backend="pyav", decode_timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(VideoDecodeError, match="did not finish within 0.5 s"):
        decode_video(videos["h264"].path, config=config, key="slow-sample")
    assert time.monotonic() - started < 5
