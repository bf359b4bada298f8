"""Generation benchmark: prefill and decode tokens/s over context lengths and sp sizes, vision codes/s and seconds
per generated frame, and the time to the first answer token about a cached video, for the host-driven decode
loops (one dispatch and host round trip per token: `host_generate_*`, the implementation before the device
loops) and the device loops (`generate_text`: jitted chunks of tokens; `generate_vision`: a jitted call per
frame), measured in the same run on the same machine.

For each sp (a 1,1,1,sp mesh over the first sp devices; simulated CPU devices on a CPU host) and each context
length it times `Generator.prefill` of a random prompt of that many tokens, then greedy decoding of
`--new-tokens` tokens after it by both loops at each batch size of `--batches`. At the smallest sp: vision
codes/s of both loops (one row, no guidance) and seconds per frame as `lvm generate` makes them (guidance pairs,
VQGAN decode included). On the largest sp, a video of `--video-frames` random frames in the video-first layout:
time to the first answer token of a question (a) on the cached video context (append the question, sample) by
both paths and (b) from scratch (VQGAN-encode the frames, prefill the video, append the question, sample).
Params are the checkpoint's with --checkpoint (and its VQGAN when tokenizers.json names one), else random from
--config; speed does not depend on the weights, and token ids are random (the text tokenizer plays no part in
the timings). The targets (`evaluate_targets`, pure functions of the rows) are printed and saved. Writes
OUT/generate.json and OUT/generate.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from lvm.bench import common

FULL = dict(
    contexts=(1024, 4096, 16384), sp=(1, 2, 4, 8), new_tokens=64, batches=(1, 8), frames=4, video_frames=64,
    reps=3,
)  # fmt: skip
# --quick is a smoke run (a few minutes on 2 loaded cores, mostly compiles).
QUICK = dict(contexts=(256, 1024), sp=(1, 4), new_tokens=32, batches=(1, 8), frames=2, video_frames=8, reps=3)
QUESTION_TOKENS = 24
GUIDANCE = 3.0
IMPLS = ("host", "device")
TEXT_SPEEDUP = 5.0  # device loop's text tokens/s over the host loop's, batch 1, smallest sp
TARGET_CONTEXT = 1024  # the text target is judged at contexts up to this
CODES_SPEEDUP = 10.0  # device loop's vision codes/s over the host loop's, batch 1
NOTES = [
    "Prefill tokens/s: context tokens / wall time of Generator.prefill (ring attention over sp) of one prompt "
    "of exactly that many tokens, padded to the generator's bucket ('padded' column), logits and cache "
    "returned. Decode tokens/s: batch x new tokens / wall time of greedy decoding of that many tokens per row "
    "right after a prompt of that length in every row. host: host_generate_text, the loop before this "
    "change (one sample and one extend dispatch per token, the ids brought to the host each time); device: "
    "generate_text (a jitted while_loop of up to 'decode_chunk' tokens per call: sampling, EOS and the "
    "cache update in the graph). Minimum over the timed calls after one warm-up (compile) call.",
    "Vision: codes/s of one row (no guidance) generating the frames after a short text prompt, codes only; "
    f"seconds per frame with guidance {GUIDANCE} (a conditional and an unconditional row) as `lvm generate` "
    "makes them, VQGAN decode of the frames included. host: host_generate_vision (two dispatches a code); "
    "device: a jitted call per frame, the next frame generated while the previous one is decoded.",
    "Time to first token: a question about a video whose prefix is already prefilled (append the question's "
    "tokens, sample one token; host: extend_chunked + sample, device: Generator.append + the decode loop's "
    "first token, picked without a decode step, as Model.answer streams it) versus from scratch (VQGAN-encode the frames, prefill the "
    "video-first prefix, then the device path).",
    "On a CPU host the sp devices are simulated and share the same cores, so larger sp shows the overhead of "
    "sharding, not a speed-up; random weights and random token ids (speed does not depend on them).",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", help="training workdir or `lvm export` folder (default: random params)"
    )
    parser.add_argument("--config", default="model/tiny", help="model config without --checkpoint")
    parser.add_argument("--vqgan-config", default="tiny", help="random VQGAN config when no checkpoint VQGAN")
    parser.add_argument(
        "--contexts", type=int, nargs="+", help=f"prompt lengths (default {FULL['contexts']})"
    )
    parser.add_argument("--sp", type=int, nargs="+", help=f"sequence-parallel sizes (default {FULL['sp']})")
    parser.add_argument("--new-tokens", type=int, help=f"decoded tokens (default {FULL['new_tokens']})")
    parser.add_argument(
        "--batches", type=int, nargs="+", help=f"decode batch sizes (default {FULL['batches']})"
    )
    parser.add_argument("--frames", type=int, help=f"generated frames (default {FULL['frames']})")
    parser.add_argument(
        "--video-frames", type=int, help=f"frames of the cached video (default {FULL['video_frames']})"
    )
    parser.add_argument("--reps", type=int, help="timed calls after the warm-up")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (CPU only; default 8)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument("--out", default="runs/bench/generate", help="output folder (default: %(default)s)")


def run(args) -> int:
    common.configure_cpu_devices(args.devices)  # before jax is imported
    import jax

    from lvm.generation import DEFAULT_CHUNK

    preset = QUICK if args.quick else FULL
    pick = lambda name: getattr(args, name) or preset[name]
    reps, new_tokens, batches = pick("reps"), pick("new_tokens"), pick("batches")
    sps = [s for s in pick("sp") if s <= jax.device_count()]
    if not sps:
        raise ValueError(f"no sp size fits the {jax.device_count()} devices; give smaller --sp")
    machine = common.machine_info()
    print(f"machine: {describe_machine(machine)}")
    vqgan = _vqgan(args)
    results, decode, vision = [], [], []
    for sp in sps:
        gen, cfg = _generator(args, sp)
        for n in pick("contexts"):
            results.append(_prefill(gen, cfg, sp, n, new_tokens, reps))
            rows = [_decode(gen, cfg, sp, n, new_tokens, b, impl, reps) for b in batches for impl in IMPLS]
            decode.extend(rows)
            speeds = ", ".join(f"{r['impl']} b={r['batch']} {r['tokens_per_s']:.0f}" for r in rows)
            print(f"sp={sp} context={n}: prefill {results[-1]['prefill_tokens_per_s']:.0f} tokens/s; "
                  f"decode tokens/s {speeds}")  # fmt: skip
        if sp == sps[0]:
            vision = [_vision(gen, cfg, vqgan, sp, pick("frames"), impl, reps) for impl in IMPLS]
            for r in vision:
                print(f"vision sp={sp} {r['impl']}: {r['codes_per_s']:.0f} codes/s, "
                      f"{common.fmt_seconds(r['frame_s'])} per frame (guidance, decode included)")  # fmt: skip
    second = _second_question(gen, cfg, vqgan, sps[-1], pick("video_frames"), reps)
    print(f"first token about a cached video (sp={sps[-1]}, {second['prompt_tokens']} tokens): device "
          f"{common.fmt_seconds(second['cached_s'])}, host {common.fmt_seconds(second['cached_host_s'])}, "
          f"from scratch {common.fmt_seconds(second['scratch_s'])}")  # fmt: skip
    targets = evaluate_targets(decode, vision)
    for name, t in targets.items():
        print(f"target {name}: {common.fmt_met(t['met'])} ({t['reason']})")
    payload = {
        "benchmark": "generate",
        "date": common.utc_now(),
        "machine": machine,
        "load_average": common.load_average(),
        "model": args.checkpoint or args.config,
        "notes": NOTES,
        "decode_chunk": DEFAULT_CHUNK,
        "results": results,
        "decode": decode,
        "vision": vision,
        "second_question": second,
        "targets": targets,
    }
    out = pathlib.Path(args.out)
    path = common.write_json(out / "generate.json", payload)
    (out / "generate.md").write_text(markdown(payload) + "\n")
    print(json.dumps({"out": str(path), "targets_met": {k: t["met"] for k, t in targets.items()}}))
    return 0


def describe_machine(m: dict) -> str:
    """The machine in words: CPU model, cores, backend and devices."""
    sim = " simulated" if m.get("simulated_cpu_devices") else ""
    return (
        f"{m['cpu_model']}, {m['cpu_affinity'] or m['cpu_count']} cores; jax {m['jax_version']} "
        f"{m['backend']} x{m['device_count']}{sim} ({m['device_kind']})"
    )


def _generator(args, sp: int):
    """A Generator over a 1,1,1,sp mesh of the first sp devices (checkpoint or random params)."""
    import jax

    from lvm import checkpoint
    from lvm.config import MeshConfig, load_config
    from lvm.generation import Generator
    from lvm.model import init_params
    from lvm.sharding import make_mesh

    mesh_cfg = MeshConfig(1, 1, 1, sp)
    if args.checkpoint:
        cfg, mesh, params = checkpoint.restore_model(args.checkpoint, mesh_cfg, jax.devices()[:sp])
    else:
        cfg = load_config([args.config], [f"mesh=1,1,1,{sp}"])
        mesh = make_mesh(mesh_cfg, jax.devices()[:sp])
        params = init_params(cfg, mesh, jax.random.key(0))
    return Generator(params, cfg, mesh), cfg


def _prompts(cfg, n: int, rows: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [
        (rng.integers(1, cfg.model.text_vocab_size, n).astype(np.int32), np.zeros(n, bool))
        for _ in range(rows)
    ]


def _prefill(gen, cfg, sp: int, n: int, new_tokens: int, reps: int) -> dict:
    prompt = _prompts(cfg, n, 1, n)
    pre = common.time_calls(lambda: gen.prefill(prompt, new_tokens), (), reps=reps)
    return {
        "sp": sp,
        "context": n,
        "padded": gen.bucket(n),
        "prefill_s": pre["time_s"],
        "prefill_tokens_per_s": n / pre["time_s"],
        "prefill": pre,
    }


def _decode(gen, cfg, sp: int, n: int, new_tokens: int, batch: int, impl: str, reps: int) -> dict:
    """Greedy decoding of `new_tokens` tokens per row after `batch` prompts of n tokens, by `impl`."""
    from lvm.generation import generate_text, host_generate_text

    logits, _, cache = gen.prefill(_prompts(cfg, n, batch, n), new_tokens)
    fn = host_generate_text if impl == "host" else generate_text
    timing = common.time_calls(lambda: fn(gen, cache, logits, new_tokens, -1), (), reps=reps)
    return {
        "sp": sp,
        "context": n,
        "impl": impl,
        "batch": batch,
        "new_tokens": new_tokens,
        "time_s": timing["time_s"],
        "cpu_s": timing["cpu_s"],
        "tokens_per_s": batch * new_tokens / timing["time_s"],
        "timing": timing,
    }


def _vqgan(args):
    """The checkpoint's VQGAN if its tokenizers.json names one, else a random one of --vqgan-config."""
    from lvm.checkpoint import read_tokenizers
    from lvm.tokenizers.config import load_config
    from lvm.tokenizers.vqgan import VQGANTokenizer, init_variables

    path = read_tokenizers(args.checkpoint).get("vqgan") if args.checkpoint else None
    if path:
        return VQGANTokenizer.load(path)
    cfg = load_config(args.vqgan_config).model
    return VQGANTokenizer(cfg, init_variables(cfg))


def _vision(gen, cfg, vqgan, sp: int, frames: int, impl: str, reps: int) -> dict:
    """Codes/s of one unguided row and seconds per guided frame (VQGAN decode included), by `impl`."""
    import numpy as np

    from lvm.generation import Sampling, VisionDecoder, host_generate_vision

    h, w = vqgan.code_shape
    n_codes = vqgan.cfg.codebook_size
    prompts = _prompts(cfg, 8, 2, 1)
    _, logits, cache = gen.prefill(prompts, frames * (h * w + 1))
    guided = (logits, cache)
    _, one, one_cache = gen.prefill(prompts[:1], frames * (h * w + 1))

    def codes(logits, cache, guidance):  # codes [g, frames, h*w]
        if impl == "host":
            return host_generate_vision(gen, cache, logits, frames, h * w, n_codes, Sampling(), guidance)
        return np.stack(list(VisionDecoder(gen, cache, logits, frames, h * w, n_codes, guidance=guidance)), 1)

    def video():  # as `lvm generate` makes a video: guidance pairs, each frame decoded to pixels
        if impl == "host":
            return vqgan.decode(codes(*guided, GUIDANCE)[0].reshape(frames, h, w))
        frames_out = VisionDecoder(gen, guided[1], guided[0], frames, h * w, n_codes, guidance=GUIDANCE)
        return np.stack([vqgan.decode(c[:1].reshape(1, h, w))[0] for c in frames_out])

    plain = common.time_calls(lambda: codes(one, one_cache, None), (), reps=reps)
    full = common.time_calls(video, (), reps=reps)
    return {
        "sp": sp,
        "impl": impl,
        "batch": 1,
        "frames": frames,
        "codes_per_frame": h * w,
        "codes_s": plain["time_s"],
        "cpu_s": plain["cpu_s"],
        "codes_per_s": frames * h * w / plain["time_s"],
        "frame_s": full["time_s"] / frames,
        "guidance": GUIDANCE,
        "codes": plain,
        "video": full,
    }


def _second_question(gen, cfg, vqgan, sp: int, frames: int, reps: int) -> dict:
    """Time to the first answer token of a question on a cached video context (device and host paths) vs
    from scratch."""
    import numpy as np

    from lvm.generation import Sampling, TextDecoder, sample

    rng = np.random.default_rng(0)
    res = vqgan.cfg.resolution
    pixels = rng.integers(0, 256, (frames, res, res, 3), np.uint8)
    n_codes = vqgan.cfg.codebook_size
    text = lambda k: rng.integers(1, cfg.model.text_vocab_size, k).astype(np.int32)
    system, closer, question = text(12), text(1), text(QUESTION_TOKENS)

    def video_prefix(codes):  # system text, codes + <eof> per frame, </vision>: ids and vision mask
        per_frame = codes.reshape(len(codes), -1)
        vision = np.concatenate([per_frame, np.full((len(codes), 1), n_codes)], 1).reshape(-1)
        ids = np.concatenate([system, vision, closer]).astype(np.int32)
        mask = np.zeros(len(ids), bool)
        mask[len(system) : len(system) + len(vision)] = True
        return ids, mask

    room = len(question) + 8
    q_vis = np.zeros(len(question), bool)

    def first_token(cache):  # as Model.answer: append the question, the decode loop's first chunk
        logits, _, cache = gen.append(cache, [(question, q_vis)])
        return next(iter(TextDecoder(gen, cache, logits, 8, -1)))

    def first_token_host(cache):  # before: the question extended in pieces, then one sample
        logits, _, _ = gen.extend_chunked(cache, question[None], q_vis[None])
        return np.asarray(sample(None, logits[:, -1], Sampling()))

    def scratch():
        ids, mask = video_prefix(vqgan.encode(pixels))
        _, _, cache = gen.prefill([(ids, mask)], room)
        return first_token(cache)

    ids, mask = video_prefix(vqgan.encode(pixels))
    _, _, cache = gen.prefill([(ids, mask)], room)
    cached = common.time_calls(first_token, (cache,), reps=reps)
    cached_host = common.time_calls(first_token_host, (cache,), reps=reps)
    fresh = common.time_calls(scratch, (), reps=reps)
    encode = common.time_calls(vqgan.encode, (pixels,), reps=reps)
    return {
        "sp": sp,
        "frames": frames,
        "prompt_tokens": len(ids) + len(question),
        "question_tokens": len(question),
        "cached_s": cached["time_s"],
        "cached_host_s": cached_host["time_s"],
        "scratch_s": fresh["time_s"],
        "encode_s": encode["time_s"],
        "speedup": fresh["time_s"] / cached["time_s"],
        "cached": cached,
        "cached_host": cached_host,
        "scratch": fresh,
    }


# ----------------------------------------------------------------------------------------------------------
# Targets: pure functions of the rows


def _speedups(rows, key: str, **match) -> list[dict[str, Any]]:
    """device / host ratio of `key` for every setting (the row fields besides impl and timings) in `rows`
    whose fields equal `match`, where both were measured."""
    setting = lambda r: tuple((k, r[k]) for k in ("sp", "context", "batch") if k in r)
    host = {
        setting(r): r for r in rows if r["impl"] == "host" and all(r.get(k) == v for k, v in match.items())
    }
    out = []
    for r in rows:
        h = host.get(setting(r))
        if r["impl"] == "device" and h and h[key] and r[key]:
            cpu = h["cpu_s"] / r["cpu_s"] if h.get("cpu_s") and r.get("cpu_s") else None
            out.append(
                {
                    **dict(setting(r)),
                    "host": h[key],
                    "device": r[key],
                    "speedup": r[key] / h[key],
                    "cpu_speedup": cpu,
                }
            )
    return out


def _speedup_target(ratios, need: float, what: str, rule: str) -> dict[str, Any]:
    where = lambda r: ", ".join(f"{k}={r[k]}" for k in ("sp", "context", "batch") if k in r)
    return {
        "rule": rule,
        "ratios": ratios,
        **common.verdict(
            ratios,
            lambda r: r["speedup"] >= need,
            lambda r: f"{where(r)}: {r['speedup']:.1f}x ({r['host']:.0f} -> {r['device']:.0f} {what})",
            need=f">= {need}x",
            missing=f"no host and device pair measured at batch 1 ({what})",
        ),
    }


def text_tokens_5x(decode_rows) -> dict[str, Any]:
    """Device loop's text tokens/s at batch 1 over the host loop's, at the smallest sp, at every context up to
    TARGET_CONTEXT (longer ones are listed, not judged)."""
    rows = [r for r in decode_rows if r["batch"] == 1]
    sp = min((r["sp"] for r in rows), default=None)
    ratios = _speedups(rows, "tokens_per_s", sp=sp)
    target = _speedup_target(
        [r for r in ratios if r["context"] <= TARGET_CONTEXT],
        TEXT_SPEEDUP,
        "tokens/s",
        f"greedy text tokens/s of the device loop >= {TEXT_SPEEDUP}x the host loop's at batch 1, at the smallest "
        f"sp measured, at every context up to {TARGET_CONTEXT} tokens (where the host loop was measured at 1.1K "
        "tokens/s before; at longer contexts a step's own work, the same in both loops, dominates on a CPU)",
    )
    return {**target, "all_contexts": ratios}


def vision_codes_10x(vision_rows) -> dict[str, Any]:
    """Device loop's vision codes/s of one row over the host loop's."""
    return _speedup_target(
        _speedups([r for r in vision_rows if r["batch"] == 1], "codes_per_s"),
        CODES_SPEEDUP,
        "codes/s",
        f"vision codes/s of the device loop >= {CODES_SPEEDUP}x the host loop's at batch 1 (no guidance)",
    )


def evaluate_targets(decode_rows, vision_rows) -> dict[str, Any]:
    return {"text_tokens_5x": text_tokens_5x(decode_rows), "vision_codes_10x": vision_codes_10x(vision_rows)}


def markdown(payload: dict) -> str:
    """The results as markdown tables plus the targets and notes."""
    prefill = [
        (r["sp"], r["context"], r["padded"], f"{r['prefill_tokens_per_s']:.0f}", common.fmt_seconds(r["prefill_s"]))
        for r in payload["results"]
    ]  # fmt: skip
    decode = [
        (r["sp"], r["context"], r["batch"], f"{r['host']:.0f}", f"{r['device']:.0f}", f"{r['speedup']:.1f}x",
         "-" if r["cpu_speedup"] is None else f"{r['cpu_speedup']:.1f}x")
        for r in _speedups(payload["decode"], "tokens_per_s")
    ]  # fmt: skip
    by_impl = {r["impl"]: r for r in payload["vision"]}
    vision = [
        (h["sp"], h["codes_per_frame"], f"{h['codes_per_s']:.0f}", f"{d['codes_per_s']:.0f}",
         f"{d['codes_per_s'] / h['codes_per_s']:.1f}x", common.fmt_seconds(h["frame_s"]),
         common.fmt_seconds(d["frame_s"]))
        for h, d in [(by_impl.get("host"), by_impl.get("device"))] if h and d
    ]  # fmt: skip
    s = payload["second_question"]
    second = common.markdown_table(
        ["sp", "frames", "prompt tokens", "cached (device)", "cached (host)", "from scratch",
         "of which VQGAN encode", "speed-up"],
        [(s["sp"], s["frames"], s["prompt_tokens"], common.fmt_seconds(s["cached_s"]),
          common.fmt_seconds(s["cached_host_s"]), common.fmt_seconds(s["scratch_s"]),
          common.fmt_seconds(s["encode_s"]), f"{s['speedup']:.1f}x")],
    )  # fmt: skip
    targets = common.markdown_table(
        ["target", "met", "why"],
        [(name, common.fmt_met(t["met"]), t["reason"]) for name, t in payload["targets"].items()],
    )
    m = payload["machine"]
    return "\n\n".join([
        f"# Generation benchmark ({payload['model']}, {payload['date']})",
        f"Machine: {describe_machine(m)}; load average {payload['load_average']}.",
        "## Targets",
        targets,
        "## Prefill",
        common.markdown_table(["sp", "context", "padded", "prefill tokens/s", "prefill"], prefill),
        "## Text decoding (greedy): host loop vs device loop",
        common.markdown_table(
            ["sp", "context", "batch", "host tokens/s", "device tokens/s", "speed-up", "CPU-time speed-up"], decode
        ),
        "## Vision: codes/s (one row) and seconds per frame (guidance, VQGAN decode included)",
        common.markdown_table(
            ["sp", "codes a frame", "host codes/s", "device codes/s", "speed-up", "host s/frame", "device s/frame"],
            vision,
        ),
        "## Time to the first answer token about a cached video",
        second,
        *(f"- {n}" for n in payload["notes"]),
    ])  # fmt: skip
