"""LWM import and Hugging Face export: tiny checkpoints written in LWM's on-disk formats (tux streaming msgpack via
flax's own `to_bytes`, a pickled VQGAN) are imported and give the logits LWM's conventions give, computed here
independently in numpy; the exported Llama gives the same logits under PyTorch `transformers`."""

import importlib.util
import io
import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import flax.serialization
import ml_dtypes
import msgpack
import numpy as np
import pytest
from conftest import TORCH_AVAILABLE

from lvm import cli
from lvm.cli import run_command
from lvm.interop import lwm, safe_pickle, tux_stream

D, L, V, F, VV, HEADS, HD = 64, 2, 320, 96, 64, 4, 16
THETA = 10000.0
MANIFEST = Path(__file__).resolve().parents[3] / "shared" / "lwm_params.json"


def lwm_vqgan_shapes(
    base: int, mult: Sequence[int], n_res: int, latent: int, codes: int, up_res: int | None = None
) -> dict[str, tuple]:
    """LWM's VQGAN tree ('/'-joined paths -> shapes) for a config (LWM's: 128, (1,2,2,4,6), 2, 64, 8192);
    `up_res` ResNet blocks per decoder up level (None: LWM's n_res + 1)."""
    up_res = n_res + 1 if up_res is None else up_res
    out: dict[str, tuple] = {}

    def conv(path, k, cin, cout):
        out[f"{path}/kernel"], out[f"{path}/bias"] = (k, k, cin, cout), (cout,)

    def norm(path, c):
        out[f"{path}/scale"], out[f"{path}/bias"] = (c,), (c,)

    def resblock(path, cin, cout):
        norm(f"{path}/GroupNorm_0", cin), conv(f"{path}/Conv_0", 3, cin, cout)
        norm(f"{path}/GroupNorm_1", cout), conv(f"{path}/Conv_1", 3, cout, cout)
        if cin != cout:
            conv(f"{path}/Conv_2", 1, cin, cout)

    chans = [base * m for m in mult]
    conv("encoder/Conv_0", 3, 3, base)
    c = base
    for i, ch in enumerate(chans):
        for j in range(n_res):
            resblock(f"encoder/DownsamplingBlock_{i}/ResnetBlock_{j}", c, ch)
            c = ch
        if i < len(chans) - 1:
            conv(f"encoder/DownsamplingBlock_{i}/Downsample_0/Conv_0", 3, c, c)
    for j in range(2):
        resblock(f"encoder/MidBlock_0/ResnetBlock_{j}", c, c)
        resblock(f"decoder/MidBlock_0/ResnetBlock_{j}", c, c)
    norm("encoder/GroupNorm_0", c), conv("encoder/Conv_1", 3, c, latent)
    conv("quant_conv", 1, latent, latent), conv("post_quant_conv", 1, latent, latent)
    out["quantize/embeddings"] = (codes, latent)
    conv("decoder/Conv_0", 3, latent, c)
    for u, level in enumerate(reversed(range(len(chans)))):
        for j in range(up_res):
            resblock(f"decoder/UpsamplingBlock_{u}/ResnetBlock_{j}", c, chans[level])
            c = chans[level]
        if level > 0:
            conv(f"decoder/UpsamplingBlock_{u}/Upsample_0/Conv_0", 3, c, c)
    norm("decoder/GroupNorm_0", c), conv("decoder/Conv_1", 3, c, 3)
    return dict(sorted(out.items()))


def lwm_llama(seed, stacked=True, vision=True, dtype=np.float32) -> dict:
    """Random weights under LWM's names (tuple keys), as LWM's modules would hold them."""
    rng = np.random.default_rng(seed)
    tree = {}
    for path, shape in lwm.lwm_llama_shapes(D, L, V, F, VV if vision else None, stacked).items():
        norm = path.endswith("norm/kernel") or path.endswith("ln_f/kernel")
        w = 1.0 + 0.1 * rng.standard_normal(shape) if norm else 0.2 * rng.standard_normal(shape)
        tree[tuple(path.split("/"))] = w.astype(dtype)
    return tree


def write_tux(path, tree, max_chunk=4096, monkeypatch=None):
    """What tux's StreamingCheckpointer writes: packer.pack((key, flax.serialization.to_bytes(leaf)))."""
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", max_chunk)
    packer = msgpack.Packer()
    with open(path, "wb") as f:
        for key, value in tree.items():
            f.write(packer.pack((key, flax.serialization.to_bytes(value))))


def lwm_logits(tree, tokens, vision_mask, theta=THETA, eps=1e-6):
    """LWM's LLaMA forward in float64 numpy: interleaved complex RoPE, RMSNorm, SwiGLU, untied heads."""
    w = {"/".join(k): np.asarray(v, np.float64) for k, v in tree.items()}

    def layer_w(i, name):
        stacked = f"transformer/h/scan_decoder/{name}/kernel"
        return w[stacked][i] if stacked in w else w[f"transformer/h/{i}/{name}/kernel"]

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    def rope(x, pos):  # [S, H, hd]: pairs (2i, 2i+1) as complex numbers, as in LWM's apply_rotary_emb
        freqs = 1.0 / theta ** (np.arange(0, HD, 2) / HD)
        cis = np.exp(1j * pos[:, None] * freqs)[:, None, :]
        xc = (x[..., 0::2] + 1j * x[..., 1::2]) * cis
        return np.stack([xc.real, xc.imag], -1).reshape(x.shape)

    S = len(tokens)
    pos = np.arange(S, dtype=np.float64)
    vte = w.get("transformer/vte/embedding")
    x = np.where(
        vision_mask[:, None],
        vte[tokens % VV] if vte is not None else 0,
        w["transformer/wte/embedding"][tokens % V],
    )
    causal = np.tril(np.ones((S, S), bool))
    for i in range(L):
        h = rms(x, layer_w(i, "attention_norm"))
        q, k, v = ((h @ layer_w(i, f"attention/{n}")).reshape(S, HEADS, HD) for n in ("wq", "wk", "wv"))
        q, k = rope(q, pos), rope(k, pos)
        s = np.einsum("shd,thd->hst", q, k) / np.sqrt(HD)
        s = np.where(causal, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hst,thd->shd", p, v).reshape(S, D) @ layer_w(i, "attention/wo")
        h = rms(x, layer_w(i, "ffn_norm"))
        g = h @ layer_w(i, "feed_forward/w1")
        x = x + (g / (1 + np.exp(-g)) * (h @ layer_w(i, "feed_forward/w3"))) @ layer_w(i, "feed_forward/w2")
    x = rms(x, w["transformer/ln_f/kernel"])
    vision = x @ w["vision_head/kernel"] if "vision_head/kernel" in w else np.zeros((S, 8448))
    return x @ w["lm_head/kernel"], vision


def inputs(seed=0, S=16):
    rng = np.random.default_rng(seed)
    vision_mask = np.zeros(S, bool)
    vision_mask[4:12] = True
    tokens = np.where(vision_mask, rng.integers(0, VV, S), rng.integers(0, V, S))
    return tokens, vision_mask


def our_logits(folder, tokens, vision_mask):
    """Forward pass of an imported folder with this project's model (one device, its config's compute dtype)."""
    import jax
    import jax.numpy as jnp

    from lvm import checkpoint
    from lvm.config import MeshConfig
    from lvm.model import Batch, forward

    cfg, mesh, params = checkpoint.restore_model(folder, MeshConfig(1, 1, 1, 1), jax.devices()[:1])
    S = len(tokens)
    row = lambda x, dt=jnp.int32: jnp.asarray(x, dt)[None]
    batch = Batch(row(tokens), row(vision_mask, bool), row(np.arange(S)), row(np.ones(S)), row(tokens),
                  row(vision_mask, bool), row(np.ones(S), jnp.float32))  # fmt: skip
    text, vision = forward(params, batch, cfg, mesh)
    return np.asarray(text[0]), np.asarray(vision[0]), cfg


def test_stream_writer_matches_flax_bytes_and_reader_round_trips(monkeypatch):
    leaves = {("a", "b"): np.arange(15, dtype=np.float32).reshape(3, 5),
              ("c",): np.linspace(-1, 1, 280).astype(ml_dtypes.bfloat16).reshape(40, 7)}  # fmt: skip
    flax_bytes = io.BytesIO()
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 256)
    for key, value in leaves.items():
        flax_bytes.write(msgpack.Packer().pack((key, flax.serialization.to_bytes(value))))
    ours = io.BytesIO()
    tux_stream.write(ours, leaves, max_chunk_bytes=256)
    assert ours.getvalue() == flax_bytes.getvalue()
    ours.seek(0)
    records = list(tux_stream.scan(ours))
    assert [len(r.pieces) for r in records] == [1, 3]  # 560 bf16 bytes -> chunks of 128 elements
    for r in records:
        got = tux_stream.RecordReader(ours, r).read(r.nbytes).view(r.dtype).reshape(r.shape)
        np.testing.assert_array_equal(got, leaves[r.key])


@pytest.mark.parametrize(
    "stacked,dtype,vision,rope_layout,compute",
    [
        (True, ml_dtypes.bfloat16, True, "interleaved", None),
        (False, np.float32, True, "half", None),
        (True, np.float32, False, "interleaved", None),
        (True, ml_dtypes.bfloat16, True, "interleaved", "bfloat16"),
    ],  # fmt: skip
    ids=["stacked-bf16", "unstacked-f32-half", "text-only", "bf16-compute"],
)
def test_import_gives_lwm_logits(tmp_path, monkeypatch, stacked, dtype, vision, rope_layout, compute):
    tree = lwm_llama(1, stacked, vision, dtype)
    write_tux(tmp_path / "params", tree, monkeypatch=monkeypatch)
    with open(tmp_path / "params", "rb") as f:
        assert any(len(r.pieces) > 1 for r in tux_stream.scan(f))  # at least one tensor split into chunks
    if compute is None:  # the default: LWM's float32
        lwm.convert_lwm(str(tmp_path / "params"), tmp_path / "out", head_dim=HD, rope_theta=THETA, seq_len=64,
                        rope_layout=rope_layout, log=lambda *_: None)  # fmt: skip
    else:  # the command's --dtype option
        argv = ["--params", str(tmp_path / "params"), "--out", str(tmp_path / "out"), "--head-dim", str(HD),
                "--theta", str(THETA), "--seq-len", "64", "--rope-layout", rope_layout, "--dtype", compute]  # fmt: skip
        assert run_command("convert-lwm", argv) == 0
    tokens, vision_mask = inputs()
    text, vis, cfg = our_logits(tmp_path / "out", tokens, vision_mask)
    assert (cfg.model.n_layers, cfg.model.n_heads, cfg.model.rope_layout) == (L, HEADS, rope_layout)
    # stored as the file stores them (LWM's bf16 release is not rounded), computed in float32 unless asked
    assert (cfg.model.param_dtype, cfg.model.dtype) == (np.dtype(dtype).name, compute or "float32")
    ref_text, ref_vision = lwm_logits(tree, tokens, vision_mask)
    ref_vision = ref_vision[:, : vis.shape[1]]
    agree = [np.mean(a.argmax(-1) == b.argmax(-1)) for a, b in [(text, ref_text), (vis, ref_vision)]]
    if compute is None:
        np.testing.assert_allclose(text, ref_text, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(vis, ref_vision, atol=1e-4, rtol=1e-4)
        assert agree == [1.0, 1.0]
    else:  # bfloat16: the same model to bf16 rounding (README: ~97% of argmaxes on these tiny models)
        assert 1e-3 < np.abs(text - ref_text).max() < 0.5 and np.abs(vis - ref_vision).max() < 0.5
        assert min(agree) >= 0.8, agree


def lwm_vqgan(seed, base=32, mult=(1, 2), latent=16, codes=64, up_res=None):
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in lwm_vqgan_shapes(base, mult, 2, latent, codes, up_res).items():
        scale = path.endswith("/scale")
        flat[path] = (1.0 + 0.1 * rng.standard_normal(shape) if scale else
                      rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]) if len(shape) > 1 else 10)).astype(np.float32)  # fmt: skip
    tree = {}
    for path, arr in flat.items():
        node = tree
        for part in path.split("/")[:-1]:
            node = node.setdefault(part, {})
        node[path.split("/")[-1]] = arr
    return tree, flat


def lwm_ops(flat):
    """LWM's VQGAN layers on a flat tree: conv (HWIO), GroupNorm(32, eps 1e-6), ResnetBlock (1x1 Conv_2 shortcut
    where present)."""
    import jax
    import jax.numpy as jnp

    def conv(x, path, stride=1, pad="SAME"):
        y = jax.lax.conv_general_dilated(x, flat[f"{path}/kernel"], (stride, stride), pad,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        return y + flat[f"{path}/bias"]

    def gn(x, path):
        b, h, w, c = x.shape
        g = x.reshape(b, h, w, 32, c // 32)
        g = (g - g.mean((1, 2, 4), keepdims=True)) / jnp.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-6)
        return g.reshape(x.shape) * flat[f"{path}/scale"] + flat[f"{path}/bias"]

    def block(x, path):
        h = conv(jax.nn.silu(gn(x, f"{path}/GroupNorm_0")), f"{path}/Conv_0")
        h = conv(jax.nn.silu(gn(h, f"{path}/GroupNorm_1")), f"{path}/Conv_1")
        return (conv(x, f"{path}/Conv_2") if f"{path}/Conv_2/kernel" in flat else x) + h

    return conv, gn, block


def lwm_encode(flat, frames):
    """LWM's VQGAN encoder + quantizer (zero-pad (0,1) + VALID stride-2 downsampling, GroupNorm(32, 1e-6))."""
    import jax
    import jax.numpy as jnp

    conv, gn, block = lwm_ops(flat)
    x = conv(jnp.asarray(frames, jnp.float32) / 127.5 - 1, "encoder/Conv_0")
    for i in range(2):
        for j in range(2):
            x = block(x, f"encoder/DownsamplingBlock_{i}/ResnetBlock_{j}")
        if i == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            x = conv(x, "encoder/DownsamplingBlock_0/Downsample_0/Conv_0", 2, "VALID")
    for j in range(2):
        x = block(x, f"encoder/MidBlock_0/ResnetBlock_{j}")
    x = conv(jax.nn.silu(gn(x, "encoder/GroupNorm_0")), "encoder/Conv_1")
    z = conv(x, "quant_conv").reshape(-1, flat["quantize/embeddings"].shape[1])
    e = flat["quantize/embeddings"]
    d = (z**2).sum(1, keepdims=True) + (e**2).sum(1)[None] - 2 * z @ e.T
    return np.asarray(jnp.argmin(d, 1)).reshape(len(frames), *x.shape[1:3])


def lwm_decode(flat, codes):
    """LWM's VQGAN decode (float32, pixels in about [-1, 1]), its structure read off the tree: code vectors ->
    post_quant_conv -> Conv_0 -> MidBlock_0 -> UpsamplingBlock_0.. (every ResnetBlock_j in order, then
    Upsample_0 = nearest x2 + 3x3 conv where present) -> GroupNorm_0, swish, Conv_1."""
    import re

    import jax
    import jax.numpy as jnp

    conv, gn, block = lwm_ops(flat)

    def count(pattern):
        return len({m.group(1) for p in flat if (m := re.match(pattern, p))})

    x = jnp.asarray(flat["quantize/embeddings"])[jnp.asarray(codes)]
    x = conv(conv(x, "post_quant_conv"), "decoder/Conv_0")
    for j in range(count(r"decoder/MidBlock_0/ResnetBlock_(\d+)/")):
        x = block(x, f"decoder/MidBlock_0/ResnetBlock_{j}")
    for u in range(count(r"decoder/UpsamplingBlock_(\d+)/")):
        for j in range(count(rf"decoder/UpsamplingBlock_{u}/ResnetBlock_(\d+)/")):
            x = block(x, f"decoder/UpsamplingBlock_{u}/ResnetBlock_{j}")
        if f"decoder/UpsamplingBlock_{u}/Upsample_0/Conv_0/kernel" in flat:
            x = jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)
            x = conv(x, f"decoder/UpsamplingBlock_{u}/Upsample_0/Conv_0")
    return np.asarray(conv(jax.nn.silu(gn(x, "decoder/GroupNorm_0")), "decoder/Conv_1"))


def our_decode(tokenizer, codes):
    """This project's float decode (before the uint8 cast) with a loaded VQGANTokenizer's config and variables."""
    from lvm.tokenizers.vqgan import VQGAN

    return np.asarray(
        VQGAN(tokenizer.cfg).apply(tokenizer.variables, np.asarray(codes, np.int32), method=VQGAN.decode)
    )


@pytest.mark.parametrize("mult,up_res", [((1, 2, 2), None), ((1, 2), 1)], ids=["lwm-3-blocks", "1-block"])
def test_vqgan_import_maps_every_tensor_and_decodes_as_lwm(tmp_path, mult, up_res):
    from flax.traverse_util import flatten_dict

    from lvm.tokenizers.vqgan import VQGANTokenizer

    vq_tree, vq_flat = lwm_vqgan(9, mult=mult, up_res=up_res)
    (tmp_path / "vqgan").write_bytes(pickle.dumps(vq_tree))
    summary = lwm.convert_vqgan(str(tmp_path / "vqgan"), tmp_path / "vq", log=lambda *_: None)
    tok = VQGANTokenizer.load(tmp_path / "vq")
    cfg = tok.cfg
    want = 3 if up_res is None else up_res  # LWM's released layout: num_res_blocks + 1
    assert (cfg.num_res_blocks, cfg.decoder_res_blocks, cfg.up_res_blocks) == (2, want, want)
    assert summary["vqgan_tensors"] == len(vq_flat)
    # Nothing dropped: every LWM tensor has exactly one place in our tree (the codebook aside).
    names = lwm.vqgan_name_map(cfg)
    used = [names[f"params/{'/'.join(k)}"] for k in flatten_dict(tok.variables["params"])]
    assert sorted(used) == sorted(set(vq_flat) - {"quantize/embeddings"})
    codes = np.random.default_rng(10).integers(0, 64, (2, *cfg.code_shape))
    ref = lwm_decode(vq_flat, codes)
    ours = our_decode(tok, codes)
    assert ours.shape == ref.shape == (2, cfg.resolution, cfg.resolution, 3)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
    pixels = np.clip(np.round((ref.astype(np.float64) + 1) * 127.5), 0, 255)
    assert np.abs(tok.decode(codes).astype(np.int32) - pixels).max() <= 1  # rounding ties only


def test_decoder_res_blocks_default_keeps_the_tree():
    import jax
    from flax.traverse_util import flatten_dict

    from lvm.tokenizers.config import ModelConfig, load_config
    from lvm.tokenizers.vqgan import init_variables

    tiny = load_config("tiny").model
    assert tiny.decoder_res_blocks is None and tiny.up_res_blocks == tiny.num_res_blocks
    tree = lambda cfg: {
        k: v.shape for k, v in flatten_dict(jax.eval_shape(lambda: init_variables(cfg))).items()
    }
    import dataclasses

    same = dataclasses.replace(tiny, decoder_res_blocks=tiny.num_res_blocks)
    assert tree(same) == tree(tiny)
    more = tree(dataclasses.replace(tiny, decoder_res_blocks=tiny.num_res_blocks + 1))
    assert len(more) > len(tree(tiny))
    with pytest.raises(ValueError, match="decoder_res_blocks=0 must be positive"):
        ModelConfig(decoder_res_blocks=0)
    with pytest.raises(ValueError, match="decoder_res_blocks"):
        load_config("tiny", ["model.decoder_res_blocks=-1"])


def small_tokenizer(folder):
    """A SentencePiece model of V pieces trained on a few lines (stands in for LLaMA-2's)."""
    from lvm.tokenizers import text

    corpus = Path(folder) / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a small corpus about red and blue squares\n" for i in range(200)))
    return text.train(corpus, V, Path(folder) / "sp").model_file


@pytest.mark.slow
def test_convert_lwm_command_from_gcs_gives_a_folder_qa_loads(gcs_server, tmp_path, monkeypatch):
    from lvm.data_pipeline import storage
    from lvm.inference import load_model

    tree = lwm_llama(2, stacked=True, vision=True)
    write_tux(tmp_path / "params", tree, monkeypatch=monkeypatch)
    vq_tree, vq_flat = lwm_vqgan(3)
    storage.write_bytes("gs://test/lwm/params", (tmp_path / "params").read_bytes())
    storage.write_bytes("gs://test/lwm/vqgan", pickle.dumps(vq_tree))
    storage.write_bytes("gs://test/lwm/tokenizer.model", Path(small_tokenizer(tmp_path)).read_bytes())
    out, before = tmp_path / "out", sorted(os.listdir(tmp_path))
    argv = ["--params", "gs://test/lwm/params", "--vqgan", "gs://test/lwm/vqgan", "--text-tokenizer",
            "gs://test/lwm/missing.model", "--out", str(out), "--head-dim", str(HD), "--theta", str(THETA),
            "--seq-len", "64"]  # fmt: skip
    assert cli.main(["convert-lwm", *argv]) == 2  # a gs:// tokenizer that is not there: refused up front
    assert sorted(os.listdir(tmp_path)) == before
    argv[argv.index("gs://test/lwm/missing.model")] = "gs://test/lwm/tokenizer.model"
    assert run_command("convert-lwm", argv) == 0  # defaults: float32 compute, params stored as the file's
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["vqgan_tensors"] == len(vq_flat) and summary["vqgan_config"]["decoder_res_blocks"] == 3
    assert (summary["dtype"], summary["param_dtype"]) == ("float32", "float32")
    assert summary["params"] == str(out / "params")
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "out"])  # no partial folder left
    model = load_model(out)  # the `lvm qa` / `lvm generate` entry point: params, config, both tokenizers
    frames = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    codes = model.vqgan.encode(frames)
    np.testing.assert_array_equal(codes, lwm_encode(vq_flat, frames))
    np.testing.assert_allclose(
        our_decode(model.vqgan, codes), lwm_decode(vq_flat, codes), atol=2e-5, rtol=1e-5
    )
    tokens, vision_mask = inputs(5)
    text_logits, _, _ = our_logits(out, tokens, vision_mask)
    np.testing.assert_allclose(text_logits, lwm_logits(tree, tokens, vision_mask)[0], atol=1e-4, rtol=1e-4)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def lwm_files(tmp_path_factory):
    """A valid tiny LWM checkpoint: params file, VQGAN pickle, text tokenizer (tests copy and spoil them)."""
    folder = tmp_path_factory.mktemp("lwm")
    tree, (vq_tree, _) = lwm_llama(4), lwm_vqgan(5)
    with pytest.MonkeyPatch.context() as mp:
        write_tux(folder / "params", tree, monkeypatch=mp)
    (folder / "vqgan").write_bytes(pickle.dumps(vq_tree))
    return {"params": str(folder / "params"), "vqgan": str(folder / "vqgan"),
            "text_tokenizer": small_tokenizer(folder), "vq_tree": vq_tree}  # fmt: skip


def convert(files, out, **options):
    """convert_lwm of `files` (lwm_files, perhaps spoilt) into `out`, quietly, at the test's tiny sizes."""
    args = {k: files[k] for k in ("vqgan", "text_tokenizer")} | options
    quiet = lambda *_: None
    return lwm.convert_lwm(files["params"], out, head_dim=HD, rope_theta=THETA, seq_len=64, log=quiet, **args)


def refuse_to_write_params(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("params were written before every input was checked")

    monkeypatch.setattr(lwm, "ParamsWriter", refuse)


def _spoil(case, files, tmp):
    """`files` with one input made bad, and the error that must come of it."""
    vq = files["vq_tree"]
    if case == "unsafe-vqgan":  # unpickling would run code
        (tmp / "vqgan").write_bytes(pickle.dumps({**vq, "extra": _RunsCode(tmp / "ran")}))
        return (
            {"vqgan": str(tmp / "vqgan")},
            safe_pickle.UnsafePickleError,
            r"(posix|nt)\.system.*--trust-pickle",
        )
    if case == "vqgan-lacks-a-tensor":
        dec = {**vq["decoder"], "Conv_1": {"kernel": vq["decoder"]["Conv_1"]["kernel"]}}
        (tmp / "vqgan").write_bytes(pickle.dumps({**vq, "decoder": dec}))
        return {"vqgan": str(tmp / "vqgan")}, ValueError, "lacks decoder/Conv_1/bias"
    if case == "vqgan-extra-tensor":
        enc = {**vq["encoder"], "Extra_0": {"kernel": np.zeros((3, 3))}}
        (tmp / "vqgan").write_bytes(pickle.dumps({**vq, "encoder": enc}))
        return {"vqgan": str(tmp / "vqgan")}, ValueError, "no place for.*encoder/Extra_0/kernel"
    if case == "missing-tokenizer":
        return {"text_tokenizer": str(tmp / "missing.model")}, FileNotFoundError, "no text tokenizer at"
    if case == "not-a-tokenizer":
        (tmp / "tok.model").write_bytes(b"not a model")
        return {"text_tokenizer": str(tmp / "tok.model")}, ValueError, "not a SentencePiece model"
    if case == "truncated-params":
        (tmp / "params").write_bytes(Path(files["params"]).read_bytes()[:-100])
        return {"params": str(tmp / "params")}, ValueError, "truncated params file"
    if case == "params-of-another-model":
        return {"overrides": ["model.n_layers=3"]}, ValueError, "overrides change shapes.*n_layers"
    raise AssertionError(case)


SPOILT = ["unsafe-vqgan", "vqgan-lacks-a-tensor", "vqgan-extra-tensor", "missing-tokenizer",
          "not-a-tokenizer", "truncated-params", "params-of-another-model"]  # fmt: skip


@pytest.mark.parametrize("case", SPOILT)
def test_convert_lwm_checks_every_input_before_writing(lwm_files, tmp_path, monkeypatch, case):
    refuse_to_write_params(monkeypatch)
    bad, error, match = _spoil(case, lwm_files, tmp_path)
    files = lwm_files | {k: v for k, v in bad.items() if k != "overrides"}
    with pytest.raises(error, match=match):
        convert(files, tmp_path / "runs" / "model", overrides=bad.get("overrides", ()))
    assert not (tmp_path / "runs").exists()  # no folder, no partial one, not even the parent
    assert not (tmp_path / "ran").exists()


def test_unsafe_pickle_fails_the_command_before_any_params_are_written(
    lwm_files, tmp_path, capsys, monkeypatch
):
    vq_tree = lwm_files["vq_tree"]
    marker = tmp_path / "ran"
    (tmp_path / "evil").write_bytes(pickle.dumps({**vq_tree, "extra": _RunsCode(marker)}))
    with pytest.raises(safe_pickle.UnsafePickleError, match="system.*--trust-pickle"):
        safe_pickle.load(open(tmp_path / "evil", "rb"))
    assert not marker.exists()
    # The CLI reports it as one clear line (exit 2) before converting the params, and writes nothing.
    refuse_to_write_params(monkeypatch)
    argv = ["convert-lwm", "--params", lwm_files["params"], "--vqgan", str(tmp_path / "evil"), "--out",
            str(tmp_path / "o"), "--head-dim", str(HD)]  # fmt: skip
    assert cli.main(argv) == 2
    assert re.search(r"(posix|nt)\.system", capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["evil"]
    # A harmless non-array object passes only with --trust-pickle; arrays from jax / FrozenDict pass always.
    from fractions import Fraction

    (tmp_path / "other").write_bytes(pickle.dumps({**vq_tree, "note": Fraction(1, 3)}))
    with pytest.raises(safe_pickle.UnsafePickleError, match="fractions.Fraction"):
        lwm.convert_vqgan(str(tmp_path / "other"), tmp_path / "vq", log=lambda *_: None)
    lwm.convert_vqgan(str(tmp_path / "other"), tmp_path / "vq", trust_pickle=True, log=lambda *_: None)
    assert (tmp_path / "vq" / "config.yaml").is_file()
    import jax.numpy as jnp
    from flax.core import FrozenDict

    loaded = safe_pickle.load(io.BytesIO(pickle.dumps(FrozenDict({"a": jnp.arange(3.0)}))))
    assert isinstance(loaded["a"], np.ndarray) and loaded["a"].tolist() == [0.0, 1.0, 2.0]


def test_failed_conversion_keeps_an_existing_out_folder(lwm_files, tmp_path, monkeypatch):
    from lvm import checkpoint

    out = tmp_path / "runs" / "model"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        convert(lwm_files, tmp_path / "file")
    with pytest.raises(ValueError, match="already holds files.*--overwrite"):
        convert(lwm_files, out)
    # With --overwrite, a failure late in the write (params and VQGAN done) still leaves it as it was.
    write_tokenizers = checkpoint.write_tokenizers

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_tokenizers", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert(lwm_files, out, overwrite=True)
    assert os.listdir(tmp_path / "runs") == ["model"] and os.listdir(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(OSError, match="No space left"):  # a new folder: the parents it made go too
        convert(lwm_files, tmp_path / "new" / "deeper" / "model")
    assert sorted(os.listdir(tmp_path)) == ["file", "runs"]
    # Once the conversion succeeds it replaces the folder, and names its files where they end up.
    monkeypatch.setattr(checkpoint, "write_tokenizers", write_tokenizers)
    summary = convert(lwm_files, out, overwrite=True)
    assert os.listdir(tmp_path / "runs") == ["model"] and not (out / "keep.txt").exists()
    assert checkpoint.read_tokenizers(out) == {"text_tokenizer": str(out / "text_tokenizer.model"),
                                               "vqgan": str(out / "vqgan")}  # fmt: skip
    assert summary["params"] == str(out / "params") and (out / "params" / "_METADATA").is_file()
    assert checkpoint.read_config(out).model.dtype == "float32"


@pytest.mark.skipif(not MANIFEST.is_file(), reason="needs ../shared/lwm_params.json")
def test_lwm_tree_builders_match_the_manifest():
    import jax
    from flax.traverse_util import flatten_dict

    from lvm.tokenizers.config import ModelConfig
    from lvm.tokenizers.vqgan import init_variables

    manifest = json.loads(MANIFEST.read_text())
    shapes = lambda name: {k: tuple(v[0]) for k, v in manifest[name].items()}
    for name, vision, stacked in [("llama_7b", None, True), ("llama_7b_scan_false", None, False),
                                  ("vision_llama_7b_scan_true", 8448, True),
                                  ("vision_llama_7b_scan_false", 8448, False)]:  # fmt: skip
        assert lwm.lwm_llama_shapes(4096, 32, 32000, 11008, vision, stacked) == shapes(name), name
    vq = shapes("vqgan")
    assert lwm_vqgan_shapes(128, (1, 2, 2, 4, 6), 2, 64, 8192) == vq
    cfg = lwm.vqgan_model_config({k: np.empty(shape, np.uint8) for k, shape in vq.items()})
    # The project's default VQGAN is LWM's, with LWM's 3 ResNet blocks per decoder up level (2 in the middle).
    assert cfg == ModelConfig(decoder_res_blocks=3)
    ours = {
        "/".join(k): v.shape for k, v in flatten_dict(jax.eval_shape(lambda: init_variables(cfg))).items()
    }
    names = lwm.vqgan_name_map(cfg)
    mapped = {names[path] for path in ours if path.startswith("params/")}
    for path, shape in ours.items():
        if path.startswith("params/"):
            assert vq[names[path]] == shape, path
    assert mapped == set(vq) - {"quantize/embeddings"}  # every LWM tensor has its place: nothing dropped


# Runs in a subprocess so torch never shares a process with jax (their profilers crashed together once).
HF_LOGITS = """
import sys, numpy as np, torch, transformers
from safetensors.numpy import load_file
hf, inputs, out = sys.argv[1:]
data = np.load(inputs)
model = transformers.LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
side = {k: torch.from_numpy(v) for k, v in load_file(hf + "/vision.safetensors").items()}
ids = torch.from_numpy(data["tokens"])[None]
mask = torch.from_numpy(data["vision_mask"])[None, :, None]
vision_ids, text_ids = torch.where(mask[..., 0], ids, 0), torch.where(mask[..., 0], 0, ids)
embeds = torch.where(mask, side["vision_embed_tokens.weight"][vision_ids], model.model.embed_tokens(text_ids))
with torch.no_grad():
    h = model.model(inputs_embeds=embeds).last_hidden_state
    np.savez(out, text=model.lm_head(h)[0].numpy(), vision=(h @ side["vision_lm_head.weight"].T)[0].numpy())
"""


@pytest.mark.skipif(
    not TORCH_AVAILABLE or importlib.util.find_spec("transformers") is None,
    reason="needs torch + transformers",
)
@pytest.mark.slow
def test_export_hf_logits_match_transformers(tmp_path, monkeypatch):
    # torch runs in a subprocess only: conftest keeps it out of the test workers (see there)
    tree = lwm_llama(7, stacked=True, vision=True)
    write_tux(tmp_path / "params", tree, monkeypatch=monkeypatch)
    lwm.convert_lwm(str(tmp_path / "params"), tmp_path / "ckpt", head_dim=HD, rope_theta=THETA, seq_len=64,
                    param_dtype="float32", overrides=["model.dtype=float32"], log=lambda *_: None)  # fmt: skip
    assert (
        run_command("export-hf", ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    )
    tokens, vision_mask = inputs(8)
    ours_text, ours_vision, _ = our_logits(tmp_path / "ckpt", tokens, vision_mask)
    np.savez(tmp_path / "inputs.npz", tokens=tokens, vision_mask=vision_mask)
    args = [str(tmp_path / "hf"), str(tmp_path / "inputs.npz"), str(tmp_path / "hf_logits.npz")]
    # cwd elsewhere: from the repository root `import tokenizers` (in transformers) would find our tokenizers/
    subprocess.run([sys.executable, "-c", HF_LOGITS, *args], check=True, cwd=tmp_path)
    theirs = np.load(tmp_path / "hf_logits.npz")
    np.testing.assert_allclose(theirs["text"], ours_text, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(theirs["vision"], ours_vision, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_conversion_memory_stays_near_one_chunk(tmp_path):
    from lvm.bench.convert import measure

    result = measure(tmp_path, d_model=1024, n_layers=16, mlp_dim=2816, vocab=16000, vision_vocab=4096)
    # ~490 MB of arrays whose largest zarr chunk is 32 MB: the converter's growth tracks the chunk, not the file.
    assert result["array_bytes"] > 450e6
    assert result["peak_rss_growth_bytes"] < 0.35 * result["array_bytes"], result


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_export_hf_tokenizer_adds_bos_as_the_model_expects(tmp_path, monkeypatch):
    from lvm.tokenizers import text

    words = "in the beginning god created heaven and earth light was good day night evening morning".split()
    rng = np.random.default_rng(0)
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(2000)))
    # byte fallback needs 256 pieces + the characters; 300 fits the test model's 320 text ids
    tok = text.train(tmp_path / "corpus.txt", 300, tmp_path / "sp")
    write_tux(tmp_path / "params", lwm_llama(3, stacked=True, vision=False), monkeypatch=monkeypatch)
    lwm.convert_lwm(str(tmp_path / "params"), tmp_path / "ckpt", text_tokenizer=tok.model_file, head_dim=HD,
                    rope_theta=THETA, seq_len=64, log=lambda *_: None)  # fmt: skip
    assert (
        run_command("export-hf", ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    )
    sentence = "in the beginning god created the heaven and the earth"
    code = (
        "import sys, json, transformers\n"
        "t = transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(json.dumps(t(sys.argv[2])['input_ids']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf"), sentence], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert theirs == tok.encode_pieces([sentence])  # BOS first, then the same pieces as training used
    assert theirs[0] == tok.bos_id
