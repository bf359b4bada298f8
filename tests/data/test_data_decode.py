"""Decoding real h264 mp4s (several sizes and rates, one of three minutes) and broken files, in a worker process."""

import os
import signal
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from lvm.data_pipeline import storage
from lvm.data_pipeline.decode import DecodeConfig, DecodeError, Decoder, frame_indices
from lvm.tokenizers import metrics, synthetic
from lvm.tokenizers.video import resize_crop

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

GOOD = {  # name: (height, width, frames, fps)
    "small_8fps.mp4": (64, 96, 16, 8),
    "wide_24fps.mp4": (90, 160, 48, 24),
    "square_30fps.mp4": (128, 128, 30, 30),
}
LONG = ("long_3min.mp4", (36, 64, 720, 4))  # 180 s at 4 fps


def write_good(folder, items=None):
    """The synthetic mp4s `items` (name: (height, width, frames, fps)) in `folder`."""
    for name, (h, w, n, fps) in items or GOOD.items():
        synthetic.write_video(folder / name, synthetic.moving_pattern(h, w, n, seed=n), fps=fps)


def make_broken(folder, good_path):
    data = open(good_path, "rb").read()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    (folder / "notes.txt").write_text("not a video\n")
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
         "sine=frequency=440:duration=1", "-c:a", "aac", str(folder / "audio_only.mp4")],
        check=True,
    )  # fmt: skip


UNREADABLE = "cannot open as a video|decode failed at frame 0"  # which one depends on how far ffmpeg gets
BROKEN = {
    "truncated.mp4": UNREADABLE,
    "empty.mp4": "empty file",
    "random.mp4": UNREADABLE,
    "notes.txt": UNREADABLE,
    "audio_only.mp4": "no video stream",
    "missing.mp4": "not found",
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    write_good(folder, [*GOOD.items(), LONG])
    make_broken(folder, folder / "small_8fps.mp4")
    return folder


def test_frame_indices():
    cfg = DecodeConfig()
    np.testing.assert_array_equal(frame_indices(16, 8.0, cfg), [0, 8])  # 2 s at 1 fps
    np.testing.assert_array_equal(frame_indices(10, 30.0, cfg), [0])
    np.testing.assert_array_equal(frame_indices(5, 2.0, DecodeConfig(fps=4)), np.arange(5))  # all frames
    np.testing.assert_array_equal(frame_indices(100, 30.0, DecodeConfig(num_frames=4)), [12, 37, 62, 87])
    capped = frame_indices(3600, 1.0, DecodeConfig(max_frames=10))  # an hour at 1 fps, spread over it
    assert len(capped) == 10 and capped[0] < 360 and capped[-1] > 3240
    np.testing.assert_array_equal(
        frame_indices(5, 2.0, DecodeConfig(fps=4, max_frames=2)), [1, 3]
    )  # all, capped
    np.testing.assert_array_equal(
        frame_indices(100, 30.0, DecodeConfig(num_frames=8, max_frames=4)), [12, 37, 62, 87]
    )
    with pytest.raises(ValueError):
        DecodeConfig(fps=0)


def test_sampling_timestamps_and_pixels(videos):
    with Decoder(DecodeConfig(resolution=32, fps=2)) as dec:
        for name, (h, w, n, fps) in GOOD.items():
            frames, stamps = dec.decode(str(videos / name))
            expected = frame_indices(n, fps, DecodeConfig(fps=2))
            assert frames.shape == (len(expected), 32, 32, 3) and frames.dtype == np.uint8
            np.testing.assert_allclose(stamps, expected / fps, atol=1e-3)
            assert dec.info.frames == n and (dec.info.height, dec.info.width) == (h, w)
            truth = resize_crop(synthetic.moving_pattern(h, w, n, seed=n)[expected], 32)
            assert float(np.mean(metrics.psnr(frames, truth))) > 25  # h264 round trip, same resize and crop


@pytest.mark.slow
def test_long_video_streams_in_bounded_chunks_and_a_crash_costs_one_file(videos):
    name, (h, w, n, fps) = LONG
    with Decoder(DecodeConfig(resolution=32, fps=1, chunk_frames=16)) as dec:
        chunks = list(dec.frames(str(videos / name)))
        assert all(len(c.frames) <= 16 for c in chunks)
        stamps = np.concatenate([c.timestamps for c in chunks])
        np.testing.assert_allclose(stamps, np.arange(180), atol=1e-3)  # 1 fps over 3 minutes
        it = dec.frames(str(videos / name))
        next(it)
        os.kill(dec.pid, signal.SIGKILL)  # as if decord crashed on this file
        with pytest.raises(DecodeError, match="decoder process died"):
            list(it)
        frames, _ = dec.decode(str(videos / "small_8fps.mp4"))  # the next file decodes in a fresh worker
        assert len(frames) == 2


def test_broken_files_give_reasons(videos):
    with Decoder(DecodeConfig(resolution=32)) as dec:
        for name, reason in BROKEN.items():
            with pytest.raises(DecodeError, match=reason):
                dec.decode(str(videos / name))
        frames, _ = dec.decode(str(videos / "small_8fps.mp4"))
        assert len(frames) == 2


def test_gcs_video_goes_through_bounded_cache(videos, gcs_server, tmp_path):
    uri = "gs://test/videos/wide_24fps.mp4"
    storage.write_bytes(uri, (videos / "wide_24fps.mp4").read_bytes())
    cache = storage.FileCache(str(tmp_path / "cache"), max_bytes=1 << 20)
    with Decoder(DecodeConfig(resolution=32, fps=4), cache=cache) as dec:
        remote, _ = dec.decode(uri)
        local, _ = dec.decode(str(videos / "wide_24fps.mp4"))
        np.testing.assert_array_equal(remote, local)
        with pytest.raises(DecodeError, match="not found"):
            dec.decode("gs://test/videos/missing.mp4")
    assert cache.downloaded == [uri] and cache.cached_bytes() == 0  # the copy is gone after decoding


def _frames(dec, uri, then=None):
    return np.concatenate([c.frames for c in dec.frames(uri, then)])


def test_next_video_is_decoded_ahead_and_every_detour_still_gives_the_right_frames(videos):
    cfg = DecodeConfig(resolution=32, fps=2)
    path = lambda name: str(videos / name)  # noqa: E731
    names = list(GOOD)
    with Decoder(cfg) as ref:
        expected = {name: ref.decode(path(name))[0] for name in names}
    with Decoder(cfg) as dec:
        for name, then in zip(names, [*names[1:], None], strict=True):
            np.testing.assert_array_equal(_frames(dec, path(name), then and path(then)), expected[name])
            if then:
                pid = dec.pid
                assert dec._conn.poll(30), "the worker did not start on the queued video"
        assert dec.pid == pid  # one worker throughout
        a, b, c = names
        # the caller asks for another file than the queued one: it gets that file, then the queued one on request
        np.testing.assert_array_equal(_frames(dec, path(a), path(b)), expected[a])
        np.testing.assert_array_equal(_frames(dec, path(c)), expected[c])
        np.testing.assert_array_equal(_frames(dec, path(b)), expected[b])
        # a queued broken or missing file fails when asked for, with its own reason, and costs nothing else
        for broken in ("random.mp4", "missing.mp4"):
            np.testing.assert_array_equal(_frames(dec, path(a), path(broken)), expected[a])
            with pytest.raises(DecodeError, match=BROKEN[broken]):
                _frames(dec, path(broken), path(c))
            np.testing.assert_array_equal(_frames(dec, path(c)), expected[c])
        # the current file crashes the worker: the queued one is decoded by a fresh worker when asked for
        it = dec.frames(path(LONG[0]), path(a))
        next(it)
        os.kill(dec.pid, signal.SIGKILL)
        with pytest.raises(DecodeError, match="decoder process died"):
            list(it)
        np.testing.assert_array_equal(_frames(dec, path(a)), expected[a])


def test_queued_gcs_videos_leave_nothing_in_the_cache(videos, gcs_server, tmp_path):
    names = list(GOOD)
    for name in names:
        storage.write_bytes(f"gs://test/q/{name}", (videos / name).read_bytes())
    cache = storage.FileCache(str(tmp_path / "cache"), max_bytes=1 << 20)
    cfg = DecodeConfig(resolution=32, fps=2)
    with Decoder(cfg) as ref:
        expected = {name: ref.decode(str(videos / name))[0] for name in names}
    with Decoder(cfg, cache=cache) as dec:
        a, b, c = (f"gs://test/q/{name}" for name in names)
        np.testing.assert_array_equal(_frames(dec, a, b), expected[names[0]])
        np.testing.assert_array_equal(_frames(dec, b, c), expected[names[1]])
        assert cache.cached_bytes() > 0  # c is fetched and waiting
        next(dec.frames(c, a))  # abandoned mid-file with a queued: both copies go
    assert cache.cached_bytes() == 0
