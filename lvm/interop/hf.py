"""Export this project's text model as a Hugging Face `LlamaForCausalLM` folder; vision parts in a side file.

Output: `config.json`, `model.safetensors` (the LLaMA weights in torch `Linear` [out, in] layout), and
`vision.safetensors` with `vision_embed_tokens.weight` [Vv, d] (our `vte`) and `vision_lm_head.weight` [Vv, d]
(our `vision_head`, transposed); its header metadata names the vision vocabulary and the <eof>/<eov> ids.
Hugging Face rotates pairs (i, i + hd/2); a model trained or imported with LWM's interleaved pairs gets each
q/k head's output columns permuted (2i -> i, 2i+1 -> i + hd/2), which leaves attention scores unchanged.
Safetensors files are written tensor by tensor (the format is an 8-byte header length, a JSON header, raw
little-endian bytes), so no second copy of the model is built.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
EOF_TOKEN, EOV_TOKEN = 8192, 8193  # LWM's end-of-frame / end-of-vision ids (a 8192-code VQGAN)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict | None = None) -> None:  # fmt: skip
    """Write (name, shape, dtype, make_array) entries; each array is made and written one at a time."""
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype).name], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype, make in tensors:
            arr = np.ascontiguousarray(make(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"{name}: made shape {arr.shape}, declared {shape}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def rope_to_half(w: np.ndarray) -> np.ndarray:
    """Permute the last (head_dim) axis from interleaved pairs (2i, 2i+1) to half pairs (i, i + hd/2)."""
    hd = w.shape[-1]
    return w[..., np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])]


def hf_config(m, max_positions: int) -> dict:
    """`config.json` of the LlamaForCausalLM equivalent of ModelConfig `m`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.text_vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.mlp_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_scaling": None,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": m.param_dtype,
        "dtype": m.param_dtype,
    }


def _text_tensors(params: dict, m) -> Iterator[tuple]:
    """(HF name, shape, dtype, make) of every text-model weight."""
    L, d, h, hk, hd = m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
    layers = params["layers"]
    dtype = np.dtype(params["wte"].dtype)
    half = m.rope_layout == "half"

    def host(x):
        return lambda: np.asarray(x)

    def qk(name, i, heads):  # our [d, heads, hd] -> HF [heads*hd, d]
        return lambda: (
            (np.asarray(layers[name][i]) if half else rope_to_half(np.asarray(layers[name][i])))
            .reshape(d, heads * hd)
            .T
        )

    yield "model.embed_tokens.weight", (m.text_vocab_size, d), dtype, host(params["wte"])
    for i in range(L):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,), dtype, host(layers["attn_norm"][i])
        yield p + "self_attn.q_proj.weight", (h * hd, d), dtype, qk("wq", i, h)
        yield p + "self_attn.k_proj.weight", (hk * hd, d), dtype, qk("wk", i, hk)
        yield (
            p + "self_attn.v_proj.weight",
            (hk * hd, d),
            dtype,
            lambda i=i: np.asarray(layers["wv"][i]).reshape(d, hk * hd).T,
        )
        yield (
            p + "self_attn.o_proj.weight",
            (d, h * hd),
            dtype,
            lambda i=i: np.asarray(layers["wo"][i]).reshape(h * hd, d).T,
        )
        yield p + "post_attention_layernorm.weight", (d,), dtype, host(layers["mlp_norm"][i])
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj")):
            yield (
                p + f"mlp.{theirs}.weight",
                (m.mlp_dim, d),
                dtype,
                lambda i=i, o=ours: np.asarray(layers[o][i]).T,
            )
        yield p + "mlp.down_proj.weight", (d, m.mlp_dim), dtype, lambda i=i: np.asarray(layers["w_down"][i]).T
    yield "model.norm.weight", (d,), dtype, host(params["final_norm"])
    yield "lm_head.weight", (m.text_vocab_size, d), dtype, lambda: np.asarray(params["lm_head"]).T


def tokenizer_config(model_file: str, max_length: int) -> dict:
    """Hugging Face's LlamaTokenizer settings for a SentencePiece model: BOS first, as the model was trained."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "model_max_length": max_length,
        "legacy": False,
    }


def export_hf(checkpoint: str | Path, out: str | Path) -> dict:
    """Write `out` (config.json, model.safetensors, vision.safetensors) from an `lvm export`/`convert-lwm`
    folder or a training workdir. Returns the written paths."""
    import jax

    from lvm import checkpoint as checkpoints
    from lvm.config import MeshConfig

    checkpoint, out = Path(checkpoint), Path(out)
    cfg, _, params = checkpoints.restore_model(checkpoint, MeshConfig(1, -1, 1, 1))
    params = jax.tree.map(
        lambda x: jax.device_put(x, jax.devices("cpu")[0]), params
    )  # host copies, leaf-wise
    m = cfg.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(m, cfg.train.seq_len), indent=1))
    write_safetensors(out / "model.safetensors", list(_text_tensors(params, m)), {"format": "pt"})
    dtype = np.dtype(params["vte"].dtype)
    vision = [
        ("vision_embed_tokens.weight", (m.vision_vocab_size, m.d_model), dtype, lambda: np.asarray(params["vte"])),
        ("vision_lm_head.weight", (m.vision_vocab_size, m.d_model), dtype, lambda: np.asarray(params["vision_head"]).T),
    ]  # fmt: skip
    meta = {
        "format": "pt",
        "vision_vocab_size": m.vision_vocab_size,
        "eof_token": EOF_TOKEN,
        "eov_token": EOV_TOKEN,
    }
    write_safetensors(out / "vision.safetensors", vision, meta)
    written = {"config": str(out / "config.json"), "model": str(out / "model.safetensors"),
               "vision": str(out / "vision.safetensors")}  # fmt: skip
    tokenizer = checkpoints.read_tokenizers(checkpoint).get("text_tokenizer")
    if tokenizer and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(tokenizer, cfg.train.seq_len), indent=1)
        )
        written["tokenizer"] = str(out / "tokenizer.model")
    return written
