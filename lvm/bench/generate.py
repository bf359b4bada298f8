"""Generation benchmark: prefill and decode tokens/s over context lengths and sp sizes, and the cost of a second
question about a cached video versus encoding and prefilling the video again.

For each sp (a 1,1,1,sp mesh over the first sp devices; simulated CPU devices on a CPU host) and each context
length it times `Generator.prefill` of a random prompt of that many tokens and greedy `generate_text` of
`--new-tokens` tokens after it (one `extend` per token, host round trips included). Then, on the largest sp, a
video of `--video-frames` random frames in the video-first layout: time to the first answer token of a question
(a) on the cached video context (extend the question, sample) and (b) from scratch (VQGAN-encode the frames,
prefill the video, extend the question, sample). Params are the checkpoint's with --checkpoint (and its VQGAN
when tokenizers.json names one), else random from --config; speed does not depend on the weights, and token ids
are random (the text tokenizer plays no part in the timings). Writes OUT/generate.json and OUT/generate.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from lvm.bench import common

FULL = dict(contexts=(1024, 4096, 16384), sp=(1, 2, 4, 8), new_tokens=32, video_frames=64, reps=3)
# --quick is a smoke run (well under a minute on 2 cores, mostly compiles).
QUICK = dict(contexts=(256, 1024), sp=(1, 4), new_tokens=8, video_frames=8, reps=2)
QUESTION_TOKENS = 24
NOTES = [
    "Prefill tokens/s: context tokens / wall time of Generator.prefill (ring attention over sp) of one prompt "
    "of exactly that many tokens, padded to the generator's bucket ('padded' column), logits and cache "
    "returned. Decode tokens/s: new tokens / wall time of greedy generate_text (one extend per token, sampling "
    "and host transfers included) right after that prompt. Minimum over the timed calls after one warm-up "
    "(compile) call.",
    "Second question: time to the first answer token of a question about a video whose prefix is already "
    "prefilled (extend the question's tokens, sample one token) versus from scratch (VQGAN-encode the frames, "
    "prefill the video-first prefix, extend the question, sample).",
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
        "--video-frames", type=int, help=f"frames of the video (default {FULL['video_frames']})"
    )
    parser.add_argument("--reps", type=int, help="timed calls after the warm-up")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (CPU only; default 8)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument("--out", default="runs/bench/generate", help="output folder (default: %(default)s)")


def run(args) -> int:
    common.configure_cpu_devices(args.devices)  # before jax is imported
    import jax

    preset = QUICK if args.quick else FULL
    contexts = args.contexts or preset["contexts"]
    reps = args.reps or preset["reps"]
    new_tokens = args.new_tokens or preset["new_tokens"]
    sps = [s for s in (args.sp or preset["sp"]) if s <= jax.device_count()]
    if not sps:
        raise ValueError(f"no sp size fits the {jax.device_count()} devices; give smaller --sp")
    results = []
    for sp in sps:
        gen, cfg = _generator(args, sp)
        for n in contexts:
            results.append(_throughput(gen, cfg, sp, n, new_tokens, reps))
            r = results[-1]
            print(f"sp={sp} context={n}: prefill {r['prefill_tokens_per_s']:.0f} tokens/s, "
                  f"decode {r['decode_tokens_per_s']:.1f} tokens/s")  # fmt: skip
    second = _second_question(args, gen, cfg, sps[-1], args.video_frames or preset["video_frames"], reps)
    print(f"second question (sp={sps[-1]}, {second['prompt_tokens']} tokens): cached "
          f"{common.fmt_seconds(second['cached_s'])}, from scratch {common.fmt_seconds(second['scratch_s'])}")  # fmt: skip
    payload = {
        "benchmark": "generate",
        "date": common.utc_now(),
        "machine": common.machine_info(),
        "load_average": common.load_average(),
        "model": args.checkpoint or args.config,
        "notes": NOTES,
        "results": results,
        "second_question": second,
    }
    out = pathlib.Path(args.out)
    path = common.write_json(out / "generate.json", payload)
    (out / "generate.md").write_text(markdown(payload) + "\n")
    print(json.dumps({"out": str(path), "second_question_speedup": second["speedup"]}))
    return 0


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


def _throughput(gen, cfg, sp: int, n: int, new_tokens: int, reps: int) -> dict:
    import numpy as np

    from lvm.generation import generate_text

    rng = np.random.default_rng(n)
    prompt = [(rng.integers(1, cfg.model.text_vocab_size, n).astype(np.int32), np.zeros(n, bool))]
    pre = common.time_calls(lambda: gen.prefill(prompt, new_tokens), (), reps=reps)
    logits, _, cache = gen.prefill(prompt, new_tokens)
    dec = common.time_calls(lambda: generate_text(gen, cache, logits, new_tokens, -1), (), reps=reps)
    return {
        "sp": sp,
        "context": n,
        "padded": gen.bucket(n),
        "new_tokens": new_tokens,
        "prefill_s": pre["time_s"],
        "prefill_tokens_per_s": n / pre["time_s"],
        "decode_s": dec["time_s"],
        "decode_tokens_per_s": new_tokens / dec["time_s"],
        "prefill": pre,
        "decode": dec,
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


def _second_question(args, gen, cfg, sp: int, frames: int, reps: int) -> dict:
    """Time to the first answer token of a question on a cached video context vs from scratch."""
    import numpy as np

    from lvm.generation import Sampling, sample

    vqgan = _vqgan(args)
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
    q_vis = np.zeros((1, len(question)), bool)

    def first_token(cache):
        logits, _, _ = gen.extend_chunked(cache, question[None], q_vis)
        return np.asarray(sample(None, logits[:, -1], Sampling()))

    def scratch():
        ids, mask = video_prefix(vqgan.encode(pixels))
        _, _, cache = gen.prefill([(ids, mask)], room)
        return first_token(cache)

    ids, mask = video_prefix(vqgan.encode(pixels))
    _, _, cache = gen.prefill([(ids, mask)], room)
    cached = common.time_calls(first_token, (cache,), reps=reps)
    fresh = common.time_calls(scratch, (), reps=reps)
    encode = common.time_calls(vqgan.encode, (pixels,), reps=reps)
    return {
        "sp": sp,
        "frames": frames,
        "prompt_tokens": len(ids) + len(question),
        "question_tokens": len(question),
        "cached_s": cached["time_s"],
        "scratch_s": fresh["time_s"],
        "encode_s": encode["time_s"],
        "speedup": fresh["time_s"] / cached["time_s"],
        "cached": cached,
        "scratch": fresh,
    }


def markdown(payload: dict) -> str:
    """The results as markdown tables plus the notes."""
    rows = [
        (r["sp"], r["context"], r["padded"], f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}",
         common.fmt_seconds(r["prefill_s"]))
        for r in payload["results"]
    ]  # fmt: skip
    s = payload["second_question"]
    second = common.markdown_table(
        ["sp", "frames", "prompt tokens", "cached", "from scratch", "of which VQGAN encode", "speed-up"],
        [(s["sp"], s["frames"], s["prompt_tokens"], common.fmt_seconds(s["cached_s"]),
          common.fmt_seconds(s["scratch_s"]), common.fmt_seconds(s["encode_s"]), f"{s['speedup']:.1f}x")],
    )  # fmt: skip
    m = payload["machine"]
    return "\n\n".join([
        f"# Generation benchmark ({payload['model']}, {m['backend']} x{m['device_count']}, {payload['date']})",
        common.markdown_table(["sp", "context", "padded", "prefill tokens/s", "decode tokens/s", "prefill"], rows),
        "## Second question about a cached video: time to the first answer token",
        second,
        *(f"- {n}" for n in payload["notes"]),
    ])  # fmt: skip
