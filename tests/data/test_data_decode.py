"""Decoding real h264 mp4s (several sizes and rates, one of three minutes), still images and broken files, in a
worker process; a video over the frame limit is rejected from its metadata; long decodes show progress. A pool of
workers gives one worker's frames in order, survives a crashing and a hanging file, and bounds its memory."""

import os
import signal
import subprocess
import time

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from lvm.data_pipeline import storage
from lvm.data_pipeline.decode import (
    DecodeConfig,
    DecodeError,
    DecodePool,
    Decoder,
    TooManyFrames,
    fps_within,
    frame_indices,
)
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


def _kinds(dec, monkeypatch) -> list[str]:
    """The kinds of the messages `dec` receives from its worker from now on."""
    kinds = []
    recv = dec._recv

    def spy():
        message = recv()
        kinds.append(message[0])
        return message

    monkeypatch.setattr(dec, "_recv", spy)
    return kinds


def test_too_many_frames_are_known_from_metadata_before_any_frame_is_decoded(videos, monkeypatch):
    name, (h, w, n, fps) = LONG  # 720 frames: all of them at --fps 4
    with Decoder(DecodeConfig(resolution=32, fps=4, frame_limit=100)) as dec:
        kinds = _kinds(dec, monkeypatch)
        with pytest.raises(TooManyFrames) as err:
            dec.decode(str(videos / name))
        assert (err.value.frames, err.value.sampled, err.value.limit) == (n, n, 100)
        assert err.value.fps == pytest.approx(fps)
        assert kinds == ["too_many"]  # no "decoded", "info" or "chunk": the worker decoded nothing
        pid = dec.pid
        frames, _ = dec.decode(str(videos / "small_8fps.mp4"))  # 8 frames at --fps 4: within the limit
        assert len(frames) == 8 and dec.pid == pid  # same worker
    # the rate the message suggests samples few enough frames, and is not needlessly low
    for frames_, native, limit in [(n, fps, 100), (600, 1.0, 430), (108000, 30.0, 1000), (16, 8.0, 1)]:
        rate = fps_within(frames_, native, limit)
        assert len(frame_indices(frames_, native, DecodeConfig(fps=rate))) <= limit
        assert rate > 0.85 * limit * native / frames_, (frames_, native, limit, rate)
    assert fps_within(600, 1.0, 430) == 0.71


def test_still_images_are_one_frame_videos(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (40, 60, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "still.png")
    Image.fromarray(pixels).convert("RGBA").save(tmp_path / "alpha.png")
    smooth = np.broadcast_to(np.linspace(0, 255, 60, dtype=np.uint8)[None, :, None], (40, 60, 3))
    Image.fromarray(smooth).save(tmp_path / "photo.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(smooth).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    data = (tmp_path / "still.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    frames = [Image.fromarray(np.full((16, 16, 3), c, np.uint8)) for c in (0, 255)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "image_named.mp4").write_bytes(data)  # recognised by content, not by name
    for cfg in (DecodeConfig(resolution=32), DecodeConfig(resolution=32, num_frames=8)):
        with Decoder(cfg) as dec:
            for name in ("still.png", "alpha.png", "image_named.mp4"):
                frames, stamps = dec.decode(str(tmp_path / name))
                np.testing.assert_array_equal(frames, resize_crop(pixels[None], 32))  # as video frames are
                np.testing.assert_array_equal(stamps, [0.0])
                assert (dec.info.frames, dec.info.height, dec.info.width, dec.info.sampled) == (1, 40, 60, 1)
            frames, _ = dec.decode(str(tmp_path / "photo.jpg"))
            assert float(metrics.psnr(frames, resize_crop(smooth[None], 32))[0]) > 35
            dec.decode(str(tmp_path / "rotated.jpg"))
            assert (dec.info.height, dec.info.width) == (60, 40)  # turned upright as a viewer shows it
            with pytest.raises(DecodeError, match="cannot read the PNG image"):
                dec.decode(str(tmp_path / "truncated.png"))
            with pytest.raises(DecodeError, match="animated GIF"):
                dec.decode(str(tmp_path / "animated.gif"))
            assert len(dec.decode(str(tmp_path / "still.png"))[0]) == 1  # the decoder is still usable


def test_progress_bar_for_a_long_decode_when_asked(videos, capsys):
    path = str(videos / "wide_24fps.mp4")  # 48 frames, all of them at --fps 24
    with Decoder(DecodeConfig(resolution=32, fps=24), progress=True, progress_delay_s=0) as dec:
        frames, _ = dec.decode(path)
    err = capsys.readouterr().err
    assert len(frames) == 48 and "decoding wide_24fps.mp4" in err and "/48" in err and "frame" in err
    quiet = [
        dict(progress=True),  # a decode shorter than the delay (3 s) shows nothing
        dict(progress=None, progress_delay_s=0),  # None: only when stderr is a terminal (here it is not)
        dict(progress=False, progress_delay_s=0),
        dict(),  # off by default (pretokenize and the benchmarks have their own)
    ]
    for kwargs in quiet:
        with Decoder(DecodeConfig(resolution=32, fps=24), **kwargs) as dec:
            assert len(dec.decode(str(videos / "small_8fps.mp4"))[0]) == 16
        assert capsys.readouterr().err == "", kwargs


# The pool of workers ------------------------------------------------------------------------------------------


def _read_all(dec, uris):
    """Each video's (frames, timestamps, chunk sizes, info) or its error text, as `dec` gives them."""
    out = []
    for uri in uris:
        try:
            chunks = list(dec.frames(uri))
        except DecodeError as err:
            out.append(f"{type(err).__name__}: {err}")
            continue
        frames = np.concatenate([c.frames for c in chunks])
        stamps = np.concatenate([c.timestamps for c in chunks])
        out.append((frames, stamps, [len(c.frames) for c in chunks], dec.info))
    return out


def _assert_same(got, expected, names):
    for g, e, name in zip(got, expected, names, strict=True):
        if isinstance(e, str) or isinstance(g, str):
            assert g == e, name
        else:
            np.testing.assert_array_equal(g[0], e[0], err_msg=name)
            np.testing.assert_array_equal(g[1], e[1], err_msg=name)
            assert g[2:] == e[2:], name  # the same chunks, the same VideoInfo


def test_pool_gives_one_workers_frames_in_order(videos, tmp_path, capsys):
    """Three workers, long videos split into segments of two chunks: every video's frames, timestamps, chunk
    boundaries, info and failure are the ones a single `Decoder` gives."""
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "still.png")
    names = [LONG[0], *GOOD, "truncated.mp4", "missing.mp4", "audio_only.mp4", LONG[0], "small_8fps.mp4"]
    uris = [str(videos / n) for n in names] + [str(tmp_path / "still.png")]
    names.append("still.png")
    cfg = DecodeConfig(resolution=32, fps=2, chunk_frames=4)
    with Decoder(cfg) as one:
        expected = _read_all(one, uris)
    assert len(expected[0][0]) == 360 and expected[0][2] == [4] * 90  # 3 min at 2 fps
    with DecodePool(cfg, workers=3, segment_frames=8) as pool:
        assert pool.segment_chunks == 2
        pool.schedule(uris)
        _assert_same(_read_all(pool, uris), expected, names)
        # a video that is not the next one scheduled is decoded first; the schedule stays
        pool.schedule(uris[1:3])
        _assert_same(_read_all(pool, [uris[5], *uris[1:3]]), [expected[5], *expected[1:3]], names[1:4])
        assert pool.restarts == 0
    with DecodePool(cfg, workers=2, progress=True, progress_delay_s=0) as pool:
        frames, _ = pool.decode(str(videos / "wide_24fps.mp4"))
    err = capsys.readouterr().err
    assert len(frames) == 4 and "decoding wide_24fps.mp4" in err and "/4" in err


def test_pool_a_crash_or_a_hang_costs_one_file_and_memory_stays_bounded(videos, tmp_path):
    cfg = DecodeConfig(resolution=128, fps=1, chunk_frames=4)  # a chunk (192 KiB) fills the pipe: a worker
    # held back by the limit waits in the middle of its unit (a smaller one would sit whole in the pipe)
    names = ["small_8fps.mp4", "wide_24fps.mp4", "square_30fps.mp4"]
    with Decoder(cfg) as one:
        expected = _read_all(one, [str(videos / n) for n in names])
    hang = tmp_path / "hang.mp4"
    os.mkfifo(hang)  # opening it blocks until a writer comes: a decoder that never answers
    long = str(videos / LONG[0])  # 180 frames at 1 fps: 45 chunks in units of 2
    limit, workers = 8, 2
    with DecodePool(cfg, workers=workers, segment_frames=8, frames_in_flight=limit, timeout_s=10) as pool:
        pool.schedule([str(hang), *(str(videos / n) for n in names[:2]), long, str(videos / names[2])])
        t0 = time.monotonic()
        with pytest.raises(DecodeError, match="timed out after 10 s"):
            pool.decode(str(hang))
        assert time.monotonic() - t0 < 60
        _assert_same(_read_all(pool, [str(videos / n) for n in names[:2]]), expected[:2], names[:2])
        it = pool.frames(long)
        next(it)
        deadline = time.monotonic() + 60
        while not (pids := [pid for uri, pid in pool.running() if uri == long and pid]):
            assert time.monotonic() < deadline, "no worker is decoding the long video"
            time.sleep(0.1)
        time.sleep(1)  # the workers decode ahead until the limit, then wait
        assert pool._buffered <= limit + workers * cfg.chunk_frames
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # as if decord crashed on this file
        with pytest.raises(DecodeError, match="decoder process died"):
            for _ in it:
                assert pool._buffered <= limit + workers * cfg.chunk_frames
                # A worker that had sent its whole unit before it was killed is replaced quietly with the next
                # unit (no file lost): kill the ones decoding the video now until one dies in the middle.
                for uri, pid in pool.running():
                    if uri == long and pid:
                        os.kill(pid, signal.SIGKILL)
        _assert_same(_read_all(pool, [str(videos / names[2])]), expected[2:], names[2:])  # fresh workers
        assert pool.restarts >= 2  # the hang and the crash


def test_queued_gcs_videos_in_a_pool_leave_nothing_in_the_cache(videos, gcs_server, tmp_path):
    names = list(GOOD)
    for name in names:
        storage.write_bytes(f"gs://test/pool/{name}", (videos / name).read_bytes())
    uris = [f"gs://test/pool/{name}" for name in names]
    cache = storage.FileCache(str(tmp_path / "cache"), max_bytes=1 << 20)
    cfg = DecodeConfig(resolution=32, fps=2)
    with Decoder(cfg) as one:
        expected = _read_all(one, [str(videos / n) for n in names])
    with DecodePool(cfg, workers=2, cache=cache) as pool:
        pool.schedule(uris)
        _assert_same(_read_all(pool, uris[:2]), expected[:2], names[:2])
        pool.schedule(uris[:2])
        next(pool.frames(uris[2]))  # abandoned mid-file, with two videos decoded ahead
        with pytest.raises(DecodeError, match="not found"):
            pool.decode("gs://test/pool/missing.mp4")
    assert sorted(set(cache.downloaded)) == sorted(uris) and cache.cached_bytes() == 0


def test_default_worker_count_leaves_a_cpu_to_the_encoder(monkeypatch):
    from lvm.data_pipeline import decode

    for cpus, workers in [(1, 1), (2, 1), (8, 7), (16, 15), (64, 32)]:
        monkeypatch.setattr(decode, "available_cpus", lambda cpus=cpus: cpus)
        assert decode.default_decode_workers() == workers
    monkeypatch.undo()
    assert 1 <= decode.available_cpus() <= (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="workers >= 1"):
        DecodePool(workers=0)
