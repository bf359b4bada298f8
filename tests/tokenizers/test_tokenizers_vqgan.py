"""VQGAN tokenizer: config validation, shapes, data-parallel encode/decode equal to one device, clear errors."""

import jax
import numpy as np
import pytest

from lvm.tokenizers import config as vq_config
from lvm.tokenizers import vqgan
from lvm.tokenizers.quantizer import nearest_codes

CFG = vq_config.load_config("tiny").model


@pytest.fixture(scope="module")
def variables():
    return vqgan.init_variables(CFG, seed=0)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, CFG.resolution, CFG.resolution, 3))
    return np.clip(base + rng.integers(-40, 40, (11, CFG.resolution, CFG.resolution, 3)), 0, 255).astype(
        np.uint8
    )


def test_default_config_is_lwm_tokenizer():
    cfg = vq_config.load_config("default").model
    assert cfg == vq_config.ModelConfig(
        decoder_res_blocks=3
    )  # the YAML spells out the defaults (LWM: 3 up blocks)
    assert (cfg.resolution, cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks) == (
        256,
        128,
        (1, 2, 2, 4, 6),
        2,
    )
    assert (cfg.latent_dim, cfg.codebook_size, cfg.code_shape) == (64, 8192, (16, 16))


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="multiple of 2"):
        vq_config.load_config("tiny", ["model.resolution=60"])
    with pytest.raises(ValueError, match="must divide"):
        vq_config.load_config("tiny", ["model.norm_groups=7"])
    with pytest.raises(ValueError, match="unknown config key .train.lr."):
        vq_config.load_config("tiny", ["train.lr=1"])
    with pytest.raises(ValueError, match="perceptual_weights"):
        vq_config.load_config("tiny", ["train.perceptual_weight=1"])
    with pytest.raises(ValueError, match="learning_rate=.fast. is not a valid float"):
        vq_config.load_config("tiny", ["train.learning_rate=fast"])
    cfg = vq_config.load_config(
        "tiny", ["model.channel_mult=1,2,2", "train.batch_size=4", "train.learning_rate=1e-3"]
    )
    assert cfg.model.code_shape == (16, 16) and cfg.train.batch_size == 4 and cfg.train.learning_rate == 1e-3


def test_nearest_codes_matches_brute_force():
    rng = np.random.default_rng(1)
    z, book = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(30, 8)).astype(np.float32)
    want = np.argmin(((z[:, None] - book[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest_codes(z, book), want)


def test_eight_devices_equal_one_device(variables, frames):
    many = vqgan.VQGANTokenizer(CFG, variables, max_frames_per_device=1)  # 11 frames: chunks of 8, padded
    one = vqgan.VQGANTokenizer(CFG, variables, devices=jax.devices()[:1], max_frames_per_device=16)
    assert len(many.devices) == 8
    codes = many.encode(frames)
    assert codes.shape == (11, *CFG.code_shape) and codes.dtype == np.int32
    np.testing.assert_array_equal(codes, one.encode(frames))
    # Per-frame reference: the model applied to each frame alone.
    model = vqgan.VQGAN(CFG)
    ref = [model.apply(variables, vqgan.to_pixels(f[None]), method=vqgan.VQGAN.encode)[0] for f in frames[:3]]
    np.testing.assert_array_equal(codes[:3], np.stack(ref))
    decoded = many.decode(codes)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    # Float sums in another batch order may flip a rounding: at most one grey level, on very few pixels.
    diff = np.abs(decoded.astype(int) - one.decode(codes).astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3


def test_bad_inputs_raise_clear_errors(variables, frames):
    tok = vqgan.VQGANTokenizer(CFG, variables, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(frames.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[T, 64, 64, 3\]"):
        tok.encode(frames[:, :32])
    with pytest.raises(ValueError, match=r"\[T, 64, 64, 3\]"):
        tok.encode(frames[0])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode(np.full((1, 8, 8), 256))
    with pytest.raises(ValueError, match="integers"):
        tok.decode(np.zeros((1, 8, 8), np.float32))
    assert tok.encode(frames[:0]).shape == (0, 8, 8)


def test_ema_quantizer_moves_codes_to_their_means_and_restarts_dead_codes():
    from lvm.tokenizers.quantizer import VectorQuantizer, restart_dead_codes

    q = VectorQuantizer(codebook_size=4, dim=2, mode="ema", decay=0.5)
    z = jax.numpy.array([[1.0, 0.0], [1.2, 0.0], [0.0, 3.0]])
    v = q.init(jax.random.key(0), z)
    book = jax.numpy.array([[1.0, 0.1], [0.0, 2.0], [9.0, 9.0], [-9.0, -9.0]])
    v = {"codebook": dict(v["codebook"], embedding=book, embed_sum=book, cluster_size=jax.numpy.ones(4))}
    (z_q, codes, stats), new = q.apply(v, z, train=True, mutable=["codebook"])
    assert codes.tolist() == [0, 0, 1] and float(stats["batch_usage"]) == 0.5
    np.testing.assert_allclose(z_q, book[np.array([0, 0, 1])], atol=1e-6)
    emb = new["codebook"]["embedding"]
    # Code 0 moved halfway (decay 0.5) to the mean of its two vectors; unused codes keep their direction.
    assert abs(float(emb[0, 0]) - 1.0) < 0.15 and float(emb[1, 1]) > 2.0
    assert new["codebook"]["hits"].tolist() == [2, 1, 0, 0]
    latents = jax.numpy.array([[5.0, 5.0]])
    restarted, n = restart_dead_codes(new, latents, jax.random.key(1), "ema")
    assert int(n) == 2 and restarted["codebook"]["hits"].tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(restarted["codebook"]["embedding"][2:], [[5.0, 5.0]] * 2)
    np.testing.assert_allclose(restarted["codebook"]["embedding"][:2], emb[:2])


def test_l2_quantizer_uses_unit_codes_and_has_codebook_loss():
    from lvm.tokenizers.quantizer import VectorQuantizer

    q = VectorQuantizer(codebook_size=8, dim=4, mode="l2")
    z = jax.random.normal(jax.random.key(0), (5, 4))
    v = q.init(jax.random.key(1), z)
    (z_q, codes, stats), _ = q.apply(v, z, train=True, mutable=["codebook"])
    np.testing.assert_allclose(np.linalg.norm(z_q, axis=-1), 1.0, rtol=1e-5)
    assert float(stats["codebook"]) > 0 and "embedding" in v["params"]


def test_bench_tokenizer_quick(tmp_path):
    import argparse
    import json

    from lvm.bench import tokenizer as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--quick", "--configs", "tiny", "--out", str(tmp_path)])) == 0
    (row,) = json.loads((tmp_path / "tokenizer.json").read_text())["results"]
    assert row["config"] == "tiny" and row["encode_frames_per_s"] > 0 and row["decode_frames_per_s"] > 0


def test_perceptual_loss_from_user_weights(tmp_path):
    from lvm.tokenizers import perceptual

    rng = np.random.default_rng(0)
    arrays, cin = {}, 3
    for name in perceptual.layer_names():
        cout = 8
        arrays[f"{name}/kernel"] = rng.normal(0, 0.3, (3, 3, cin, cout)).astype(np.float32)
        arrays[f"{name}/bias"] = np.zeros(cout, np.float32)
        cin = cout
    np.savez(tmp_path / "vgg.npz", **arrays)
    loss = perceptual.PerceptualLoss.from_npz(tmp_path / "vgg.npz")
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    assert float(loss(x, x)) < 1e-6 and float(loss(x, -x)) > float(loss(x, x * 0.9)) > 0
    del arrays["conv3_2/bias"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="conv3_2/bias"):
        perceptual.PerceptualLoss.from_npz(tmp_path / "bad.npz")
