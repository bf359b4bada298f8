"""`lvm pretokenize` end to end: real mp4s and broken files, a tiny VQGAN and a SentencePiece model; errors.jsonl,
skipping finished shards, the same bytes with 1 or 3 decode workers, gs:// in and out split over two processes,
and the TFDS / ArrayRecord view."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from test_data_decode import LONG, make_broken, write_good

from lvm import cli
from lvm.data_pipeline import storage
from lvm.data_pipeline.decode import DecodeConfig, Decoder
from lvm.data_pipeline.pretokenize import PretokenizeConfig
from lvm.data_pipeline.pretokenize import run as pretokenize
from lvm.data_pipeline.shards import Corpus, ShardData
from lvm.demo.corpus import TEXT_CORPUS
from lvm.tokenizers import format as fmt
from lvm.tokenizers import text
from lvm.tokenizers.config import load_config
from lvm.tokenizers.vqgan import VQGANTokenizer, init_variables, save_model

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Videos (good and broken), a manifest, an untrained tiny VQGAN (32x32 -> 8x8 codes), a text model."""
    root = tmp_path_factory.mktemp("pretok")
    videos = root / "videos"
    videos.mkdir()
    write_good(videos)
    make_broken(videos, videos / "small_8fps.mp4")
    cfg = load_config("tiny", ["model.resolution=32", "model.channel_mult=1,2,2"])
    save_model(cfg, init_variables(cfg.model), root / "vqgan")
    tok = text.train(TEXT_CORPUS, 400, root / "sp")
    lines = [
        {"text": "In the beginning God created the heaven and the earth."},
        {"video": "videos/small_8fps.mp4", "caption": "Discs move over stripes.", "id": "cap"},
        {"video": "videos/wide_24fps.mp4", "qa": [{"question": "What moves?", "answer": "Discs."},
                                                 {"question": "Colour?", "answer": "Many."}], "id": "qa"},
        {"video": "videos/empty.mp4", "caption": "x"},
        {"text": "And the earth was without form, and void."},
        {"video": "videos/audio_only.mp4", "caption": "x"},
        "this is not json",
        {"video": "videos/square_30fps.mp4", "caption": "A square clip.", "video_loss": 1.0},
        {"video": "videos/missing.mp4", "caption": "x"},
        {"video": "videos/truncated.mp4", "caption": "x"},
        {"nothing": 1},
    ]  # fmt: skip
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return root, manifest, tok


EXPECTED_ERRORS = {
    3: "empty file",
    5: "no video stream",
    6: "JSONDecodeError",
    8: "not found",
    10: "ValueError",
}


def argv(assets, output, *extra):
    root, manifest, tok = assets
    return ["--manifest", str(manifest), "--output", str(output), "--vqgan", str(root / "vqgan"),
            "--text-tokenizer", tok.model_file, "--shard-size", "4", "--no-progress", *extra]  # fmt: skip


def test_pretokenize_records_errors_and_resume(assets, tmp_path, capsys):
    root, _, tok = assets
    out = tmp_path / "corpus"
    assert cli.run_command("pretokenize", argv(assets, out)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards"] == 3 and summary["shards_made"] == 3 and summary["frames"] == 2 + 2 + 1

    errors = {e["line"]: e["error"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == set(EXPECTED_ERRORS) | {9}  # the truncated file fails too
    for line, reason in EXPECTED_ERRORS.items():
        assert reason in errors[line], errors[line]

    corpus = Corpus.open(str(out))
    assert [i for s in corpus.shards for i in s.ids] == ["0", "cap", "qa", "4", "7"]
    vqgan = VQGANTokenizer.load(root / "vqgan")
    vocab = fmt.VisionVocab(n_codes=vqgan.cfg.codebook_size)
    with Decoder(DecodeConfig(resolution=32)) as dec:
        frames, _ = dec.decode(str(root / "videos" / "small_8fps.mp4"))
    codes = vqgan.encode(frames)
    record = ShardData.load(corpus.shards[0].uri).record(1)
    doc = fmt.parse(record, tok, vocab, frame_shape=(8, 8))
    assert doc == fmt.Document((fmt.Video(codes), fmt.Text("Discs move over stripes.", 1.0)), True, True)
    qa = fmt.parse(ShardData.load(corpus.shards[0].uri).record(2), tok, vocab, frame_shape=(8, 8))
    assert [s.text for s in qa.segments if isinstance(s, fmt.Text) and s.loss] == [" Discs.", " Many."]
    square = ShardData.load(corpus.shards[1].uri).record(1)  # line 7, "video_loss": 1.0
    assert record.loss_mask[record.vision_mask].max() == 0 and square.loss_mask[square.vision_mask].max() == 1

    # Rerun: everything finished is skipped. Lose one shard's index (a crash before it was written): only
    # that shard is made again, and errors.jsonl still lists every failure once.
    assert cli.run_command("pretokenize", argv(assets, out)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_made"] == 0
    (out / "shard-00001-of-00003.json").unlink()
    assert cli.run_command("pretokenize", argv(assets, out)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_made"] == 1
    again = [json.loads(x)["line"] for x in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(again) == sorted(errors)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def _contents(folder) -> dict[str, bytes]:
    """Every file's bytes; a shard's .npz as the bytes of each array in it (np.savez stamps the zip entries with
    the time they were written, so two runs' archives differ in those header fields alone)."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                out.update({f"{path.name}/{name}": z.read(name) for name in sorted(z.namelist())})
        else:
            out[path.name] = path.read_bytes()
    return out


def test_decode_workers_give_byte_identical_shards(assets, tmp_path, capsys):
    """The same manifest with 1 and 3 decode workers (a long video in several segments, broken files among
    good ones): the same token arrays, indexes and error log, byte for byte."""
    root, manifest, _ = assets
    write_good(tmp_path, [LONG])
    lines = manifest.read_text().splitlines()
    lines.insert(2, json.dumps({"video": str(tmp_path / LONG[0]), "caption": "A long one.", "id": "long"}))
    lines.append(lines[1])  # the first clip again, at the end
    long_manifest = root / "long_manifest.jsonl"
    long_manifest.write_text("\n".join(lines) + "\n")
    outputs = {}
    for workers in (1, 3):
        out = tmp_path / f"workers{workers}"
        args = argv(
            assets, out, "--fps", "2", "--decode-workers", str(workers), "--decode-frames-in-flight", "256"
        )
        args[1] = str(long_manifest)
        assert cli.run_command("pretokenize", args) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["decode_workers"] == workers and summary["decode_restarts"] == 0
        assert summary["frames"] == 360 + 4 + 4 + 2 + 4  # the long video: 3 min at 2 fps
        outputs[workers] = _contents(out)
    assert outputs[1].keys() == outputs[3].keys() and any(k.endswith("tokens.npy") for k in outputs[1])
    for name, data in outputs[1].items():
        assert outputs[3][name] == data, name
    corpus = Corpus.open(str(tmp_path / "workers3"))
    assert "long" in [i for s in corpus.shards for i in s.ids]


@pytest.mark.slow
def test_pretokenize_gcs_in_and_out_over_two_processes(assets, gcs_server, tmp_path):
    root, manifest, tok = assets
    for name in os.listdir(root / "videos"):
        storage.write_bytes(f"gs://test/pt/videos/{name}", (root / "videos" / name).read_bytes())
    storage.write_bytes("gs://test/pt/manifest.jsonl", manifest.read_bytes())
    for i in range(2):
        cfg = PretokenizeConfig(
            manifest="gs://test/pt/manifest.jsonl", output="gs://test/pt/out", vqgan=str(root / "vqgan"),
            text_tokenizer=tok.model_file, shard_size=4, process_index=i, process_count=2, progress=False,
        )  # fmt: skip
        summary = pretokenize(cfg)
        assert summary["shards_made"] == (2 if i == 0 else 1)
    local = tmp_path / "local"
    pretokenize(
        PretokenizeConfig(
            str(manifest), str(local), str(root / "vqgan"), tok.model_file, shard_size=4, progress=False
        )
    )
    remote, ref = Corpus.open("gs://test/pt/out"), Corpus.open(str(local))
    for a, b in zip(remote.shards, ref.shards, strict=True):
        assert a.ids == b.ids
        da, db = ShardData.load(storage.FileCache(str(tmp_path / "c")).fetch(a.uri)), ShardData.load(b.uri)
        np.testing.assert_array_equal(da.tokens, db.tokens)
        np.testing.assert_array_equal(da.loss_mask, db.loss_mask)
    names = storage.listdir("gs://test/pt/out")
    assert "errors-00000-of-00002.jsonl" in names and "errors-00001-of-00002.jsonl" in names


def test_training_imports_no_tensorflow():
    code = "import sys, lvm.data_pipeline.loader, lvm.data_pipeline.pretokenize; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_tfds_data_source_reads_the_corpus(assets, tmp_path):
    root, _, tok = assets
    out = tmp_path / "corpus"
    pretokenize(
        PretokenizeConfig(
            str(assets[1]), str(out), str(root / "vqgan"), tok.model_file, shard_size=4, progress=False
        )
    )
    script = (
        "import sys, numpy as np, tensorflow_datasets as tfds\n"
        "from lvm.data_pipeline.tfds_builder import prepare\n"
        "prepare(sys.argv[1], sys.argv[2])\n"
        "src = tfds.data_source('lvm_tokens', data_dir=sys.argv[2], split='train')\n"
        "np.savez(sys.argv[3], **{src[i]['id'].decode(): src[i]['tokens'] for i in range(len(src))})\n"
    )  # a subprocess: TensorFlow stays out of the test process (and its devices)
    subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "tfds"), str(tmp_path / "t.npz")], check=True
    )
    got = dict(np.load(tmp_path / "t.npz"))
    corpus = Corpus.open(str(out))
    assert sorted(got) == sorted(i for s in corpus.shards for i in s.ids)
    for shard in corpus.shards:
        data = ShardData.load(shard.uri)
        for i, rid in enumerate(shard.ids):
            np.testing.assert_array_equal(got[rid], data.record(i).tokens)
