"""Import LWM's released JAX checkpoints (LWM-Text / LWM-Chat, LLaMA-2-7B shaped, plus its VQGAN).

Name and layout mapping (LWM flax path -> this project's param tree; `h` = heads, `hd` = head dim):

    transformer/wte/embedding [V, d]                 -> wte [V, d]
    transformer/vte/embedding [Vv, d] (vision only)  -> vte [Vv, d]      (text-only models: zeros)
    transformer/h/{scan_decoder | i}/...             -> layers/... stacked on a leading axis L:
      attention/wq/kernel [d, h*hd]                  -> wq [d, h, hd]    (reshape; q/k permuted for rope "half")
      attention/wk, wv/kernel [d, h*hd]              -> wk, wv [d, h, hd]
      attention/wo/kernel [h*hd, d]                  -> wo [h, hd, d]
      attention_norm/kernel, ffn_norm/kernel [d]     -> attn_norm, mlp_norm
      feed_forward/w1, w3, w2/kernel                 -> w_gate, w_up, w_down
    transformer/ln_f/kernel [d]                      -> final_norm
    lm_head/kernel [d, V], vision_head/kernel        -> lm_head, vision_head (untied)

Every reshape above reinterprets C-order bytes, so a record streams straight from the file into its target
leaf, one zarr chunk at a time (`orbax_writer`): memory holds one chunk (one stacked layer at most), never the
model. LWM rotates interleaved pairs (2i, 2i+1) (`model.rope_layout=interleaved`, the default here); with
`rope_layout="half"` the q/k output columns of each head are permuted at import to Hugging Face's pairs (i, i+hd/2).

The VQGAN (a pickle, read with `safe_pickle`) maps onto `lvm.tokenizers.vqgan` names by walking both networks in
construction order (`vqgan_name_map`). LWM's decoder has num_res_blocks + 1 ResNet blocks per up level (3 in
the released tokenizer); the import reads that count from the pickle into `decoder_res_blocks`, so every tensor
is mapped, none dropped: encoding (what `lvm qa` uses) and decoding (`lvm generate` of video) are LWM's.

`convert_lwm` checks every input before it writes anything (the params file's records all map with the right
shapes, the VQGAN pickle is safe and maps completely, the text tokenizer loads, the overrides hold, the output
folder is free or `overwrite` is given), then writes into `<out>.partial-<pid>` beside `out` and renames it into
place only once all of it succeeded: a failure leaves no folder behind and an existing `out` as it was. The
converted model computes in float32 as LWM's scripts do (`--dtype fp32`); bfloat16 is an option (`dtype`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lvm.config import Config, load_config
from lvm.interop import safe_pickle, tux_stream
from lvm.interop.orbax_writer import ParamsWriter

SCAN = "scan_decoder"
LAYER_NAMES = {  # LWM path inside a layer -> our name under `layers`
    ("attention", "wq", "kernel"): "wq",
    ("attention", "wk", "kernel"): "wk",
    ("attention", "wv", "kernel"): "wv",
    ("attention", "wo", "kernel"): "wo",
    ("attention_norm", "kernel"): "attn_norm",
    ("ffn_norm", "kernel"): "mlp_norm",
    ("feed_forward", "w1", "kernel"): "w_gate",
    ("feed_forward", "w3", "kernel"): "w_up",
    ("feed_forward", "w2", "kernel"): "w_down",
}
TOP_NAMES = {
    ("transformer", "wte", "embedding"): "wte",
    ("transformer", "vte", "embedding"): "vte",
    ("transformer", "ln_f", "kernel"): "final_norm",
    ("lm_head", "kernel"): "lm_head",
    ("vision_head", "kernel"): "vision_head",
}
VISION_ONLY = ("vte", "vision_head")
TRAIN_STATE_EXTRAS = ("opt_state", "step")  # records of a streaming_train_state file that are not params
DEFAULT_VISION_VOCAB = 8448


# ----------------------------------------------------------------------------------------------------------
# The LLaMA tree


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one LWM record goes: leaf `name` of our tree, at stacked index `layer` (None: the whole leaf)."""

    name: str
    layer: int | None


def target_of(key: Sequence[str]) -> Target | None:
    """Our leaf for an LWM key path (a leading 'params' of train-state files is dropped); None if not a param."""
    key = tuple(key)
    while key and key[0] == "params":
        key = key[1:]
    if key in TOP_NAMES:
        return Target(TOP_NAMES[key], None)
    if key[:2] == ("transformer", "h") and len(key) > 3 and key[3:] in LAYER_NAMES:
        layer = None if key[2] == SCAN else int(key[2]) if key[2].isdigit() else -1
        if layer != -1:
            return Target(LAYER_NAMES[key[3:]], layer)
    return None


def lwm_llama_shapes(
    d: int, n_layers: int, vocab: int, mlp: int, vision_vocab: int | None, stacked: bool
) -> dict[str, tuple[int, ...]]:
    """LWM's LLaMA tree ('/'-joined paths -> shapes): `vision_vocab` None for LWM-Text; stacked = scan_layers."""
    layer = {
        ("attention", "wq", "kernel"): (d, d),
        ("attention", "wk", "kernel"): (d, d),
        ("attention", "wv", "kernel"): (d, d),
        ("attention", "wo", "kernel"): (d, d),
        ("attention_norm", "kernel"): (d,),
        ("ffn_norm", "kernel"): (d,),
        ("feed_forward", "w1", "kernel"): (d, mlp),
        ("feed_forward", "w3", "kernel"): (d, mlp),
        ("feed_forward", "w2", "kernel"): (mlp, d),
    }
    out = {
        "transformer/wte/embedding": (vocab, d),
        "transformer/ln_f/kernel": (d,),
        "lm_head/kernel": (d, vocab),
    }
    if vision_vocab:
        out |= {"transformer/vte/embedding": (vision_vocab, d), "vision_head/kernel": (d, vision_vocab)}
    for path, shape in layer.items():
        if stacked:
            out["/".join(("transformer", "h", SCAN, *path))] = (n_layers, *shape)
        else:
            out |= {"/".join(("transformer", "h", str(i), *path)): shape for i in range(n_layers)}
    return dict(sorted(out.items()))


def infer_model(records: Sequence[tux_stream.Record], head_dim: int) -> tuple[dict, bool]:
    """Model config keys (shapes) of a scanned LWM params file, and whether it has vision embeddings/heads."""
    leaves: dict[str, list] = {}
    for rec in records:
        t = target_of(rec.key)
        if t is not None:
            leaves.setdefault(t.name, []).append((t.layer, rec))
    missing = sorted({*LAYER_NAMES.values(), "wte", "final_norm", "lm_head"} - set(leaves))
    if missing:
        raise ValueError(
            f"the params file lacks {missing}: not an LWM LLaMA params file (keys such as "
            "transformer/h/scan_decoder/attention/wq/kernel expected)"
        )
    vision = [n for n in VISION_ONLY if n in leaves]
    if len(vision) == 1:
        raise ValueError(f"the params file has {vision[0]} but not its partner of {VISION_ONLY}")
    layers = {t for t, _ in leaves["wq"]}
    if layers == {None}:
        n_layers = leaves["wq"][0][1].shape[0]
    elif None in layers or layers != set(range(len(layers))):
        raise ValueError(
            f"layer records are neither stacked ({SCAN}) nor numbered 0..L-1: {sorted(map(str, layers))}"
        )
    else:
        n_layers = len(layers)
    vocab, d = leaves["wte"][0][1].shape
    q_out, kv_out = leaves["wq"][0][1].shape[-1], leaves["wk"][0][1].shape[-1]
    if q_out % head_dim or kv_out % head_dim:
        raise ValueError(
            f"head_dim={head_dim} does not divide the q/k width {q_out}/{kv_out}; pass --head-dim"
        )
    dims = {
        "text_vocab_size": vocab,
        "vision_vocab_size": leaves["vte"][0][1].shape[0] if vision else DEFAULT_VISION_VOCAB,
        "d_model": d,
        "n_layers": n_layers,
        "n_heads": q_out // head_dim,
        "n_kv_heads": kv_out // head_dim,
        "head_dim": head_dim,
        "mlp_dim": leaves["w_gate"][0][1].shape[-1],
    }
    return dims, bool(vision)


def source_dtype(records: Sequence[tux_stream.Record]) -> str:
    """The float dtype a params file stores its weights in (float32 when its records mix dtypes)."""
    names = {rec.dtype.name for rec in records if target_of(rec.key) is not None}
    return names.pop() if len(names) == 1 and names <= {"bfloat16", "float16", "float32"} else "float32"


def model_config(
    records, *, head_dim: int = 128, rope_theta: float = 5e7, seq_len: int = 32768, dtype: str = "float32",
    param_dtype: str = "auto", rope_layout: str = "interleaved", overrides: Sequence[str] = (),
) -> tuple[Config, bool]:  # fmt: skip
    """This project's Config for an LWM params file: shapes from the file, LWM's 7B settings otherwise.

    `dtype` is the compute dtype (LWM's scripts compute in float32); `param_dtype` the stored one ("auto": the
    file's, so LWM's bfloat16 release is stored unrounded and upcast exactly when computing in float32)."""
    dims, vision = infer_model(records, head_dim)
    if param_dtype == "auto":
        param_dtype = source_dtype(records)
    sets = [f"model.{k}={v}" for k, v in dims.items()]
    sets += [f"model.rope_theta={rope_theta}", f"model.rope_layout={rope_layout}", f"model.dtype={dtype}"]
    sets += [f"model.param_dtype={param_dtype}", f"train.seq_len={seq_len}", *overrides]
    cfg = load_config(["model/lwm_7b"], sets)
    changed = {k: getattr(cfg.model, k) for k, v in dims.items() if getattr(cfg.model, k) != v}
    if changed:
        raise ValueError(f"overrides change shapes the params file fixes: {changed}")
    return cfg, vision


def _rope_permutation(head_dim: int) -> np.ndarray:
    """Columns of one head in Hugging Face's half layout, taken from LWM's interleaved one."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _open(uri: str, block_size: int | None = None):
    from lvm.data_pipeline import storage

    if storage.is_gcs(uri):
        return storage.gcs().open(uri, "rb", block_size=block_size or 8 << 20)
    if not Path(uri).is_file():
        raise FileNotFoundError(f"no file at {uri}")
    return open(uri, "rb")


def scan_params(uri: str) -> list[tux_stream.Record]:
    """Headers of every record of an LWM params file (local or gs://), payloads skipped; a file cut short (a
    payload running past its end) is refused here, before anything is converted."""
    with _open(uri, block_size=1 << 16) as f:
        records = list(tux_stream.scan(f))
        size = f.seek(0, 2)
    for rec in records:
        end = max((offset + n for offset, n in rec.pieces), default=0)
        if end > size:
            raise ValueError(
                f"truncated params file {uri}: {'/'.join(rec.key)} ends at byte {end} of a {size}-byte file"
            )
    return records


@dataclasses.dataclass(frozen=True)
class Copy:
    """One record's place: leaf `key` of our tree (at stacked index `layer`, or whole), of shape `target`."""

    record: tux_stream.Record
    key: tuple[str, ...]
    layer: int | None
    target: tuple[int, ...]


def plan_params(
    records: Sequence[tux_stream.Record], cfg: Config
) -> tuple[dict, list[Copy], list[tuple[str, ...]]]:
    """Check that `records` fill this model's params exactly (every record known, every shape right, every leaf
    and layer covered once), reading no payload. Returns ({leaf: (shape, dtype)}, the copies, the leaves to
    zero-fill: a text-only model's vision embedding and head)."""
    from lvm.model import param_shapes

    shapes = {path: (s.shape, np.dtype(s.dtype)) for path, s in _flat(param_shapes(cfg.model))}
    copies: list[Copy] = []
    seen: set = set()
    for rec in records:
        t = target_of(rec.key)
        if t is None:
            if rec.key[0] in TRAIN_STATE_EXTRAS:
                continue
            raise ValueError(f"unknown record {'/'.join(rec.key)} in the params file")
        key = ("layers", t.name) if t.name in LAYER_NAMES.values() else (t.name,)
        full, _ = shapes[key]
        target = full[1:] if t.layer is not None else full
        if rec.shape != _lwm_shape(t.name, target, stacked=t.layer is None and key[0] == "layers"):
            raise ValueError(f"{'/'.join(rec.key)} has shape {rec.shape}; this model expects {target}")
        if (key, t.layer) in seen:
            raise ValueError(f"the params file holds {'/'.join(rec.key)} twice")
        seen.add((key, t.layer))
        copies.append(Copy(rec, key, t.layer, tuple(target)))
    zeros = []
    for key, (full, _) in shapes.items():
        stacked = key[0] == "layers"
        have = {layer for k, layer in seen if k == key}
        if key[-1] in VISION_ONLY and not have:
            zeros.append(key)  # a text-only LWM model: no vision embedding or head
        elif have != ({None} if not stacked or None in have else set(range(full[0]))):
            raise ValueError(
                f"the params file does not cover {'/'.join(key)} (layers {sorted(map(str, have))})"
            )
    return shapes, copies, zeros


def convert_params(
    uri: str, records: Sequence[tux_stream.Record], cfg: Config, out_dir: str | Path, log=print
) -> str:
    """Stream an LWM params file into `out_dir/params` (the `lvm export` layout's Orbax params); the records are
    checked (`plan_params`) before the first write."""
    shapes, copies, zeros = plan_params(records, cfg)
    m = cfg.model
    chunk_rows = {k: 1 for k in shapes if k[0] == "layers"}  # one layer per chunk
    writer = ParamsWriter(Path(out_dir) / "params", shapes, chunk_rows)
    perm = _rope_permutation(m.head_dim) if m.rope_layout == "half" else None
    with _open(uri) as f:
        for c in copies:
            rec, dtype = c.record, shapes[c.key][1]
            rope = perm if c.key[-1] in ("wq", "wk") else None
            _copy_record(f, rec, writer, c.key, c.layer, c.target, dtype, rope)
            log(f"  {'/'.join(rec.key)} {list(rec.shape)} {rec.dtype} -> {'/'.join(c.key)}")
    for key in zeros:
        writer.fill_zeros(key)
    return writer.close()


def _lwm_shape(name: str, shape: tuple, stacked: bool) -> tuple:
    """LWM's shape of our leaf `name` of `shape`: heads and head_dim merged into one axis."""
    if name in ("wq", "wk", "wv"):
        return (*shape[:-2], shape[-2] * shape[-1])
    if name == "wo":
        o = int(stacked)
        return (*shape[:o], shape[o] * shape[o + 1], *shape[o + 2 :])
    return tuple(shape)


def _copy_record(f, rec, writer, key, layer, target, dtype, perm) -> None:
    """Copy one record into leaf `key` (at stacked index `layer`), one target chunk per read."""
    reader = tux_stream.RecordReader(f, rec)
    if layer is not None:  # an unstacked layer: its whole tensor is one chunk of the stacked leaf
        row_shape, blocks = tuple(target), [(0, 1)]
    else:
        rows = writer.chunk_rows[key] if target else 1
        row_shape = tuple(target[1:])
        blocks = [(r, min(r + rows, target[0])) for r in range(0, target[0] if target else 1, rows)]
    row_elems = int(np.prod(row_shape, dtype=np.int64))
    for r0, r1 in blocks:
        raw = reader.read((r1 - r0) * row_elems * rec.dtype.itemsize)
        block = raw.view(rec.dtype).reshape((r1 - r0, *row_shape) if target else ())
        if perm is not None:
            block = block[..., perm]
        block = block.astype(dtype, copy=False)
        if layer is not None:
            writer.write(key, (layer,), block[0])
        elif target:
            writer.write(key, (slice(r0, r1),), block)
        else:
            writer.write(key, (), block)


def _flat(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, (*prefix, k))
        else:
            yield (*prefix, k), v


# ----------------------------------------------------------------------------------------------------------
# The VQGAN


def vqgan_model_config(flat: dict):
    """This project's VQGAN ModelConfig for an LWM VQGAN tree ('/'-joined paths -> arrays)."""
    from lvm.tokenizers.config import ModelConfig

    def shape(path):
        if path not in flat:
            raise ValueError(f"the VQGAN pickle lacks {path}: not LWM's VQGAN tree")
        return flat[path].shape

    base = shape("encoder/Conv_0/kernel")[-1]
    levels = len({m.group(1) for p in flat if (m := re.match(r"encoder/DownsamplingBlock_(\d+)/", p))})
    mult = tuple(
        shape(f"encoder/DownsamplingBlock_{i}/ResnetBlock_0/Conv_1/kernel")[-1] // base for i in range(levels)
    )

    def blocks(prefix):  # ResNet blocks directly under `prefix`
        return len({p.split("/")[2] for p in flat if p.startswith(f"{prefix}/ResnetBlock_")})

    n_res = blocks("encoder/DownsamplingBlock_0")
    up_res = blocks("decoder/UpsamplingBlock_0")
    for prefix, want in [(f"encoder/DownsamplingBlock_{i}", n_res) for i in range(levels)] + [
        (f"decoder/UpsamplingBlock_{u}", up_res) for u in range(levels)
    ]:
        if blocks(prefix) != want:
            raise ValueError(f"LWM VQGAN {prefix} has {blocks(prefix)} ResNet blocks, its first level {want}")
    codes, latent = shape("quantize/embeddings")
    if shape("encoder/Conv_1/kernel")[-1] != latent:
        raise ValueError(
            "LWM VQGAN z_channels differs from the codebook dimension; this project needs them equal"
        )
    for mid in ("encoder/MidBlock_0", "decoder/MidBlock_0"):
        if blocks(mid) != n_res:
            raise ValueError(
                f"LWM VQGAN {mid} holds {blocks(mid)} ResNet blocks; this project's middle blocks hold "
                f"num_res_blocks={n_res} (the ResNet blocks per encoder level)"
            )
    resolution = 16 * 2 ** (levels - 1)  # LWM: 16x16 codes per frame
    return ModelConfig(
        resolution=resolution, base_channels=base, channel_mult=mult, num_res_blocks=n_res,
        decoder_res_blocks=up_res, norm_groups=32, latent_dim=latent, codebook_size=codes, quantizer="ema",
        dtype="float32",
    )  # fmt: skip


def vqgan_name_map(cfg) -> dict[str, str]:
    """Our VQGAN param path ('params/...') -> LWM path, walking both networks in construction order."""
    n, n_res, up_res = len(cfg.channel_mult), cfg.num_res_blocks, cfg.up_res_blocks
    out: dict[str, str] = {}
    conv_i, rb = 1, 0

    def module(ours, lwm, kinds):
        out.update({f"params/{ours}/{k}": f"{lwm}/{k}" for k in kinds})

    def resblock(side, lwm):
        nonlocal rb
        for sub in ("GroupNorm_0", "GroupNorm_1"):
            module(f"{side}/ResBlock_{rb}/{sub}", f"{lwm}/{sub}", ("scale", "bias"))
        for sub in ("Conv_0", "Conv_1", "Conv_2"):
            module(f"{side}/ResBlock_{rb}/{sub}", f"{lwm}/{sub}", ("kernel", "bias"))
        rb += 1

    module("encoder/Conv_0", "encoder/Conv_0", ("kernel", "bias"))
    for i in range(n):
        for j in range(n_res):
            resblock("encoder", f"encoder/DownsamplingBlock_{i}/ResnetBlock_{j}")
        if i < n - 1:
            module(
                f"encoder/Conv_{conv_i}",
                f"encoder/DownsamplingBlock_{i}/Downsample_0/Conv_0",
                ("kernel", "bias"),
            )
            conv_i += 1
    for j in range(n_res):
        resblock("encoder", f"encoder/MidBlock_0/ResnetBlock_{j}")
    module("encoder/GroupNorm_0", "encoder/GroupNorm_0", ("scale", "bias"))
    module(f"encoder/Conv_{conv_i}", "encoder/Conv_1", ("kernel", "bias"))
    for name in ("quant_conv", "post_quant_conv"):
        module(name, name, ("kernel", "bias"))
    module("decoder/Conv_0", "decoder/Conv_0", ("kernel", "bias"))
    conv_i, rb = 1, 0
    for j in range(n_res):
        resblock("decoder", f"decoder/MidBlock_0/ResnetBlock_{j}")
    for u, level in enumerate(reversed(range(n))):
        for j in range(up_res):
            resblock("decoder", f"decoder/UpsamplingBlock_{u}/ResnetBlock_{j}")
        if level > 0:
            module(
                f"decoder/Conv_{conv_i}", f"decoder/UpsamplingBlock_{u}/Upsample_0/Conv_0", ("kernel", "bias")
            )
            conv_i += 1
    module("decoder/GroupNorm_0", "decoder/GroupNorm_0", ("scale", "bias"))
    module("decoder/conv_out", "decoder/Conv_1", ("kernel", "bias"))
    return out


def flatten_tree(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """'/'-joined paths -> numpy arrays of a nested mapping."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten_tree(v, path + "/")
        else:
            out[path] = np.asarray(v)
    return out


@dataclasses.dataclass(frozen=True)
class VQGANImport:
    """LWM's VQGAN read, checked and mapped in memory: our config and variables ('/'-joined paths)."""

    cfg: object  # lvm.tokenizers.config.ModelConfig
    variables: dict[str, np.ndarray]
    tensors: int  # LWM tensors read (all of them mapped)

    def summary(self) -> dict:
        return {"vqgan_config": dataclasses.asdict(self.cfg), "vqgan_tensors": self.tensors}

    def save(self, out_dir: str | Path) -> None:
        """Write this project's VQGAN folder at `out_dir` (replacing one there)."""
        from flax.traverse_util import unflatten_dict

        from lvm.tokenizers.config import VQGANConfig
        from lvm.tokenizers.vqgan import save_model

        workdir = Path(out_dir)
        shutil.rmtree(workdir, ignore_errors=True)
        tree = unflatten_dict({tuple(k.split("/")): v for k, v in self.variables.items()})
        save_model(VQGANConfig(model=self.cfg), tree, workdir)


def read_vqgan(uri: str, trust_pickle: bool = False, log=print) -> VQGANImport:
    """Read LWM's VQGAN pickle (restricted unpickling unless `trust_pickle`) and map every tensor onto this
    project's VQGAN, checking each shape; an LWM tensor without a place, or a place without a tensor, stops it.
    Writes nothing."""
    import jax

    from lvm.tokenizers.vqgan import init_variables

    with _open(uri) as f:
        tree = safe_pickle.load(f, trust=trust_pickle)
    if not isinstance(tree, dict):
        raise ValueError(f"the VQGAN pickle holds a {type(tree).__name__}, not a param dict")
    tree = tree.get("params", tree)
    flat = {p: a for p, a in flatten_tree(tree).items() if p.split("/")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv", "quantize")}  # fmt: skip
    cfg = vqgan_model_config(flat)
    abstract = {"/".join(k): v for k, v in _flat(jax.eval_shape(lambda: init_variables(cfg)))}
    names = vqgan_name_map(cfg)
    variables = {}
    for ours, spec in abstract.items():
        if ours.startswith("codebook/"):
            continue
        lwm = names[ours]
        if lwm not in flat:
            raise ValueError(f"the VQGAN pickle lacks {lwm} (for {ours}): not LWM's VQGAN layout")
        if flat[lwm].shape != spec.shape:
            raise ValueError(f"VQGAN {lwm} has shape {flat[lwm].shape}; {ours} needs {spec.shape}")
        variables[ours] = flat[lwm].astype(np.float32)
    codebook = flat["quantize/embeddings"].astype(np.float32)
    variables |= {
        "codebook/quantizer/embedding": codebook,
        "codebook/quantizer/embed_sum": codebook,
        "codebook/quantizer/cluster_size": np.ones(len(codebook), np.float32),
        "codebook/quantizer/hits": np.zeros(len(codebook), np.float32),
    }
    unmapped = sorted(set(flat) - set(names.values()) - {"quantize/embeddings"})
    if unmapped:
        raise ValueError(
            f"the VQGAN pickle has {len(unmapped)} tensors this project's VQGAN has no place for, e.g. "
            f"{unmapped[:3]}: not LWM's VQGAN layout"
        )
    log(
        f"  VQGAN: all {len(flat)} tensors mapped ({cfg.num_res_blocks} ResNet blocks per encoder level, "
        f"{cfg.up_res_blocks} per decoder level)"
    )
    return VQGANImport(cfg, variables, len(flat))


def convert_vqgan(uri: str, out_dir: str | Path, trust_pickle: bool = False, log=print) -> dict:
    """Read LWM's VQGAN pickle (`read_vqgan`) and write this project's VQGAN folder at `out_dir`. Returns the
    config and the number of tensors read."""
    vq = read_vqgan(uri, trust_pickle, log)
    vq.save(out_dir)
    return vq.summary()


# ----------------------------------------------------------------------------------------------------------
# The whole import


def read_text_tokenizer(uri: str, text_vocab_size: int) -> bytes:
    """The bytes of a SentencePiece model (local or gs://), checked to load and to fit the text vocabulary."""
    import sentencepiece as spm

    from lvm.data_pipeline import storage

    if not storage.exists(uri) or not (storage.is_gcs(uri) or Path(uri).is_file()):
        raise FileNotFoundError(f"no text tokenizer at {uri} (--text-tokenizer: a SentencePiece .model file)")
    data = storage.read_bytes(uri)
    try:
        pieces = spm.SentencePieceProcessor(model_proto=data).get_piece_size()
    except RuntimeError as err:  # sentencepiece's answer to bytes that are not a model
        raise ValueError(f"{uri} is not a SentencePiece model: {err}") from None
    if pieces > text_vocab_size:
        raise ValueError(
            f"the text tokenizer {uri} has {pieces} pieces; the model's text vocabulary only {text_vocab_size}"
        )
    return data


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that cannot be written, or one holding files unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"--out {out} already holds files; choose another --out, or pass --overwrite to replace it (its "
            "contents are removed only once the new conversion has succeeded)"
        )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create --out {out}: {parent} is not a writable folder")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh folder `<out>.partial-<pid>` beside `out` to write into; on success it replaces `out` (any old
    contents removed only after the rename); on any exception it is removed and `out` is left as it was."""
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    missing = [p for p in out.parents if not p.exists()]  # folders to create, and to remove again on failure
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = out.with_name(f"{out.name}.old-{os.getpid()}") if out.exists() else None
        if old is not None:
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in missing:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_lwm(
    params: str, out: str | Path, *, vqgan: str | None = None, text_tokenizer: str | None = None,
    trust_pickle: bool = False, head_dim: int = 128, rope_theta: float = 5e7, seq_len: int = 32768,
    dtype: str = "float32", param_dtype: str = "auto", rope_layout: str = "interleaved",
    overrides: Sequence[str] = (), overwrite: bool = False, log=print,
) -> dict:  # fmt: skip
    """Write an `lvm export`-style folder (params/, config.yaml, tokenizers.json, vqgan/, text tokenizer) that
    `lvm qa` and `lvm generate` load directly. Returns a summary (also written as conversion.json).

    Every input is checked before anything is written (see the module docstring); the folder appears at `out`
    only when complete. `dtype` is the compute dtype (LWM's float32 by default), `param_dtype` the stored one
    ("auto": the file's)."""
    from lvm import checkpoint

    out = Path(out).resolve()
    check_out(out, overwrite)
    log(f"scanning {params}")
    records = scan_params(params)
    cfg, vision = model_config(
        records, head_dim=head_dim, rope_theta=rope_theta, seq_len=seq_len, dtype=dtype,
        param_dtype=param_dtype, rope_layout=rope_layout, overrides=overrides,
    )  # fmt: skip
    plan_params(records, cfg)
    file_bytes = sum(r.nbytes for r in records)
    log(f"{len(records)} records, {file_bytes / 2**30:.2f} GiB of arrays; vision: {vision}")
    tokenizer_bytes = vq = None
    if text_tokenizer:
        tokenizer_bytes = read_text_tokenizer(text_tokenizer, cfg.model.text_vocab_size)
    if vqgan:
        log(f"reading VQGAN {vqgan}")
        vq = read_vqgan(vqgan, trust_pickle=trust_pickle, log=log)
    summary = {"source": params, "records": len(records), "array_bytes": file_bytes, "vision": vision}
    summary |= {"dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype, "params": str(out / "params")}
    tokenizers = {}
    with staged(out) as tmp:
        log(f"converting params into {tmp}")
        convert_params(params, records, cfg, tmp, log=log)
        checkpoint.write_config(tmp, cfg)
        if tokenizer_bytes is not None:
            (tmp / "text_tokenizer.model").write_bytes(tokenizer_bytes)
            tokenizers["text_tokenizer"] = str(out / "text_tokenizer.model")
        if vq is not None:
            vq.save(tmp / "vqgan")
            summary |= vq.summary()
            tokenizers["vqgan"] = str(out / "vqgan")
        checkpoint.write_tokenizers(tmp, tokenizers)  # the paths the folder will have once renamed into place
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=1))
    log(f"wrote {out}")
    return summary
