"""The Python API under `lvm qa`, `lvm generate` and the evals: load a checkpoint, ask about a video, generate.

    model = load_model("runs/demo/export")            # params + config + the tokenizers it was trained with
    video = model.read_video("clip.mp4")              # frames sampled to fit the context, VQGAN codes
    ctx = model.video_context(video)                  # the video-first prompt prefix, prefilled once
    model.answer(ctx, "What colour was the square?")  # any number of questions reuse ctx's KV cache

A checkpoint folder is a training workdir (newest checkpoint) or an `lvm export` folder. Either holds
`tokenizers.json` with the absolute paths of the SentencePiece model and VQGAN workdir it was trained with
(`lvm export --text-tokenizer/--vqgan` or the training corpora's headers set them); arguments override them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from lvm.checkpoint import TOKENIZERS_FILE, read_tokenizers, restore_model
from lvm.config import Config, MeshConfig
from lvm.generation import DEFAULT_CHUNK, Generator, Sampling, TextDecoder, VisionDecoder
from lvm.model import KVCache
from lvm.tokenizers import format as fmt

GREEDY = Sampling()
SAMPLED = Sampling(temperature=1.0, top_k=100)
FEWER_FRAMES = "sample fewer frames (--max-frames / --fps), shorten the question or lower --max-new-tokens"


@dataclasses.dataclass
class VideoContext:
    """A video-first prompt prefix and its prefilled KV cache (reused by every question about the video)."""

    codes: np.ndarray  # [T, h, w]
    prefix_len: int
    cache: KVCache
    room: int  # free cache slots after the prefix


class Model:
    """A trained model ready for inference on this host's devices (sequence-parallel over all of them)."""

    def __init__(self, checkpoint: str | Path, *, text_tokenizer=None, vqgan=None, mesh: str | None = None):
        from lvm.tokenizers.text import SentencePieceTokenizer

        folder = Path(checkpoint)
        mesh_cfg = MeshConfig.parse(mesh) if mesh else MeshConfig(1, 1, 1, -1)
        self.cfg: Config
        self.cfg, self.mesh, self.params = restore_model(folder, mesh_cfg)
        cfg = self.cfg
        self.generator = Generator(self.params, cfg, self.mesh)
        paths = read_tokenizers(folder)
        text_tokenizer = text_tokenizer or paths.get("text_tokenizer")
        if not text_tokenizer:
            raise FileNotFoundError(
                f"{folder} names no text tokenizer: the model was trained on data without a recorded tokenizer "
                f"(its {TOKENIZERS_FILE} names none, as with synthetic data); pass the SentencePiece model it "
                "was trained with: --text-tokenizer PATH to lvm qa / lvm generate, text_tokenizer=PATH in Python"
            )
        self.codec = SentencePieceTokenizer(text_tokenizer)
        if self.codec.vocab_size > cfg.model.text_vocab_size:
            raise ValueError(
                f"the text tokenizer {text_tokenizer} has {self.codec.vocab_size} pieces but the model's text "
                f"vocabulary is {cfg.model.text_vocab_size}: it is not the tokenizer the model was trained with "
                "(--text-tokenizer)"
            )
        self.vqgan_path = vqgan or paths.get("vqgan")
        self._vqgan = None
        self.context = cfg.train.seq_len  # the length the model was trained at

    # Tokenizers ------------------------------------------------------------------------------------------------

    @property
    def vqgan(self):
        if self._vqgan is None:
            if not self.vqgan_path:
                raise FileNotFoundError(
                    f"this checkpoint names no VQGAN ({TOKENIZERS_FILE}); pass --vqgan PATH (vqgan=PATH in Python)"
                )
            from lvm.tokenizers.vqgan import VQGANTokenizer

            self._vqgan = VQGANTokenizer.load(self.vqgan_path)
        return self._vqgan

    @property
    def vocab(self) -> fmt.VisionVocab:
        n_codes = self.vqgan.cfg.codebook_size
        return fmt.VisionVocab(n_codes=n_codes, n_reserved=self.cfg.model.vision_vocab_size - n_codes)

    def tokens(self, doc: fmt.Document) -> fmt.TokenRecord:
        return fmt.build(doc, self.codec, self.vocab)

    def frame_tokens(self) -> int:
        return fmt.tokens_per_frame(self.vqgan.code_shape)

    def frames_that_fit(self, reserve: int) -> int:
        """Frames a video-first prompt can hold with `reserve` tokens left for question and answer."""
        return fmt.frames_that_fit(self.context, reserve, self.vqgan.code_shape, self.codec)

    def read_video(
        self,
        uri: str,
        *,
        fps: float | None = None,
        num_frames: int | None = None,
        max_frames: int | None = None,
        reserve: int | None = None,
        progress: bool | None = None,
        decode_workers: int | None = None,
    ) -> np.ndarray:
        """VQGAN codes [T, h, w] of a video file, still image (one frame) or gs:// URI. By default as many
        frames as fit the context with `reserve` (256 if None) tokens left for question and answer, evenly over
        the video; fps / num_frames / max_frames override. With `reserve` given, a video whose frames would
        not fit the context with `reserve` to spare is rejected (ValueError) before any frame is decoded.
        `progress`: a bar on stderr for a long decode (None: when stderr is a terminal). `decode_workers`: see
        `read_videos`."""
        opts = dict(fps=fps, num_frames=num_frames, max_frames=max_frames, reserve=reserve, progress=progress)
        with contextlib.closing(self.read_videos([uri], decode_workers=decode_workers, **opts)) as videos:
            return next(videos)

    def read_videos(
        self,
        uris: Sequence[str],
        *,
        fps: float | None = None,
        num_frames: int | None = None,
        max_frames: int | None = None,
        reserve: int | None = None,
        progress: bool | None = None,
        decode_workers: int | None = None,
    ) -> Iterator[np.ndarray]:
        """The codes of each video in turn, as `read_video` reads one. `decode_workers` processes (default: one
        per CPU but one, `decode.default_decode_workers`) decode the videos ahead, a long one in segments, while
        the VQGAN encodes; the codes do not depend on the count (starting a worker costs about a second, so
        read many videos through one call)."""
        from lvm.data_pipeline.decode import DecodeError, DecodePool, TooManyFrames, fps_within

        uris = list(uris)
        kept = 256 if reserve is None else reserve
        fit = self.frames_that_fit(kept)  # the most frames a prompt can hold with `kept` tokens to spare
        if fit < 1 and (reserve is not None or (fps is None and num_frames is None)):
            raise ValueError(
                f"no frame fits the model's context of {self.context} tokens with {kept} kept for the question "
                "and answer"
            )
        if fps is None and num_frames is None:
            num_frames = fit
        limit = None if reserve is None else fit
        overhead, per_frame = fmt.prefix_overhead(self.codec), self.frame_tokens()

        def too_long(what: str, frames: int, fix: str) -> ValueError:
            need = overhead + frames * per_frame + kept
            return ValueError(
                f"{what}: {frames} frames need {need} tokens ({per_frame} a frame, {kept} for the question and "
                f"answer); the model's context is {self.context}: {fix}"
            )

        asked = None if num_frames is None else min(num_frames, max_frames or num_frames)
        if limit is not None and asked is not None and asked > limit:
            # known without opening any video: the count of any video at least that long
            flag = "--max-frames" if asked != num_frames else "--num-frames"
            what = uris[0] if len(uris) == 1 else f"{len(uris)} videos"
            raise too_long(f"{what} ({flag} {asked})", asked, f"use {flag} {limit} or fewer")
        decode_cfg = self.decode_config(fps, num_frames, max_frames, limit)
        with DecodePool(decode_cfg, workers=decode_workers, progress=progress) as pool:
            pool.schedule(uris)
            for uri in uris:
                try:
                    codes = self.encode_frames(pool, uri)
                except TooManyFrames as err:  # from the video's metadata, before decoding
                    seconds = err.frames / err.fps
                    length = f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
                    fix = f"use --fps {fps_within(err.frames, err.fps, limit):g} or --max-frames {limit}"
                    raise too_long(f"{uri} ({length} at --fps {fps:g})", err.sampled, fix) from None
                except DecodeError as err:
                    raise ValueError(f"cannot read the video {uri}: {err}") from None
                if codes is None:
                    raise ValueError(f"no frames could be sampled from {uri}")
                yield codes

    def decode_config(self, fps: float | None, num_frames: int | None, max_frames: int | None, frame_limit):
        """How `read_videos` samples frames: `num_frames` evenly, else at `fps` (1 if None), at most
        `max_frames`; over `frame_limit` frames is `TooManyFrames` (None: no limit)."""
        from lvm.data_pipeline.decode import DecodeConfig

        return DecodeConfig(
            resolution=self.vqgan.cfg.resolution,
            fps=fps or 1.0,
            num_frames=num_frames,
            max_frames=max_frames,
            frame_limit=frame_limit,
        )

    def encode_frames(self, source, uri: str, on_chunk: Callable | None = None) -> np.ndarray | None:
        """VQGAN codes [T, h, w] of the frames `source` (a `Decoder` or `DecodePool`) decodes from `uri`, None
        when it gives none; `on_chunk(chunk, codes, info)` after each chunk is encoded (`info`: the video's
        `VideoInfo`, once known). Decoding errors (`DecodeError`, `TooManyFrames`) pass through."""
        codes = []
        for chunk in source.frames(uri):
            codes.append(self.vqgan.encode(chunk.frames))
            if on_chunk is not None:
                on_chunk(chunk, codes[-1], source.info)
        return np.concatenate(codes) if codes else None

    # Question answering ----------------------------------------------------------------------------------------

    def video_context(self, codes: np.ndarray, room: int = 256) -> VideoContext:
        """Prefill the video-first prefix of `codes` once; `room` tokens are kept for question + answer."""
        rec = self.tokens(fmt.video_first_prefix(fmt.Video(codes)))
        self._check_length(
            len(rec) + room, f"a video of {len(codes)} frames plus {room} tokens of room", FEWER_FRAMES
        )
        _, _, cache = self.generator.prefill([(rec.tokens, rec.vision_mask)], room)
        return VideoContext(codes, len(rec), cache, room)

    def _question_tokens(self, ctx: VideoContext, question: str) -> tuple[np.ndarray, np.ndarray]:
        """The tokens after the shared prefix of `video_first_chat(question)` (ending with 'ASSISTANT:')."""
        rec = self.tokens(fmt.video_first_chat(question, fmt.Video(ctx.codes)))
        return rec.tokens[ctx.prefix_len :], rec.vision_mask[ctx.prefix_len :]

    def _check_length(self, n: int, what: str, fix: str) -> None:
        """A prompt of n tokens must fit the context; `fix` says how (naming the command's flags)."""
        if n > self.context:
            raise ValueError(
                f"the prompt needs {n} tokens ({what}) but the model's context is {self.context}; {fix}"
            )

    def _ask(self, ctx: VideoContext, question: str, extra: int):
        """The question's tokens appended to a copy of the video's cache: the text logits [V] of its last token
        (on the device) and that cache (`ctx.cache` is left as it was, for the next question)."""
        ids, vis = self._question_tokens(ctx, question)
        n = ctx.prefix_len + len(ids) + extra
        self._check_length(n, f"video prefix {ctx.prefix_len} + question + {extra} new tokens", FEWER_FRAMES)
        if len(ids) + extra > ctx.room:
            raise ValueError(
                f"question + answer need {len(ids) + extra} tokens but the video context keeps {ctx.room}; "
                "build it with a larger room"
            )
        text, _, cache = self.generator.append(ctx.cache, [(ids, vis)])
        return text[0], cache

    def _text_decoder(
        self, cache: KVCache, logits, max_new_tokens: int, sampling, seed, chunk=DEFAULT_CHUNK
    ) -> TextDecoder:
        return TextDecoder(
            self.generator, cache, logits, max_new_tokens, self.codec.eos_id, sampling, seed,
            vocab_size=self.codec.vocab_size, chunk=chunk,
        )  # fmt: skip

    def _answer_decoder(
        self, ctx, question, *, max_new_tokens=64, sampling=GREEDY, seed=0, chunk=DEFAULT_CHUNK
    ):
        logits, cache = self._ask(ctx, question, max_new_tokens)
        return self._text_decoder(cache, logits[None], max_new_tokens, sampling, seed, chunk)

    def _pieces(self, decoder: TextDecoder) -> Iterator[str]:
        """Row 0's new text after each decoded chunk; a trailing incomplete character waits for its bytes."""
        shown = ""
        for _ in decoder:
            text = self.codec.decode(decoder.tokens[0], continuation=True)
            stable = text if decoder.done[0] else text.rstrip("\ufffd")
            if len(stable) > len(shown) and stable.startswith(shown):
                yield stable[len(shown) :]
                shown = stable

    def _text(self, decoder: TextDecoder, on_text: Callable[[str], None] | None) -> str:
        """Decode to the end, handing `on_text` each piece; row 0's whole text."""
        for piece in self._pieces(decoder):
            if on_text:
                on_text(piece)
        return self.codec.decode(decoder.tokens[0], continuation=True)

    def answer_stream(
        self, ctx: VideoContext, question: str, chunk: int = DEFAULT_CHUNK, **options
    ) -> Iterator[str]:
        """`answer` as an iterator of text pieces, one per decoded chunk of `chunk` tokens, the first piece
        right after the first token; `options` are `answer`'s (max_new_tokens, sampling, seed). The pieces'
        concatenation, stripped, is `answer`'s result."""
        yield from self._pieces(self._answer_decoder(ctx, question, chunk=chunk, **options))

    def answer(
        self,
        ctx: VideoContext,
        question: str,
        *,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        seed: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The model's answer to `question` about the video of `ctx`; `on_text` receives text as it comes (a
        piece per decoded chunk, see `answer_stream`)."""
        decoder = self._answer_decoder(
            ctx, question, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed
        )
        return self._text(decoder, on_text).strip()

    def option_logprobs(self, ctx: VideoContext, question: str, options: list[str]) -> list[float]:
        """Log-likelihood of each option as the answer after the question (summed over its tokens)."""
        answers = self._answer_tokens(options)
        logits, cache = self._ask(ctx, question, max(len(a) for a in answers))
        return [self._answer_logprob(np.asarray(logits), cache, a) for a in answers]

    def question_only_logprobs(self, question: str, options: list[str]) -> list[float]:
        """`option_logprobs` for the chat prompt without any video (a baseline: what the text alone implies)."""
        rec = self.tokens(fmt.question_only_prompt(question))
        answers = self._answer_tokens(options)
        text, _, cache = self.generator.prefill([(rec.tokens, rec.vision_mask)], max(len(a) for a in answers))
        return [self._answer_logprob(text[0], cache, a) for a in answers]

    def _answer_tokens(self, options: list[str]) -> list[list[int]]:
        """The tokens of each option as an answer, continuing the prompt."""
        return [self.codec.encode(fmt.answer_text(option), continuation=True) for option in options]

    def _answer_logprob(self, logits: np.ndarray, cache: KVCache, answer: list[int]) -> float:
        """log p(answer | prompt) from the prompt's last logits [V] and its cache (left unchanged)."""
        rows = [logits[None]]
        if len(answer) > 1:
            ids = np.asarray(answer)[None, :-1]
            text, _, _ = self.generator.extend_chunked(cache, ids, np.zeros(ids.shape, bool))
            rows.append(text[0])
        predictors = np.concatenate(rows, axis=0)[:, : self.codec.vocab_size]  # row i predicts answer[i]
        logp = predictors - _logsumexp(predictors)  # over the ids the tokenizer can produce (no padded rows)
        return float(np.sum(logp[np.arange(len(answer)), answer]))

    # Generation ------------------------------------------------------------------------------------------------

    def generate_text(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        seed: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """Continue a text prompt; `on_text` receives the continuation as it comes (a piece per decoded chunk)."""
        ids = np.asarray(self.codec.encode_pieces([prompt]))
        self._check_length(
            len(ids) + max_new_tokens,
            f"prompt + {max_new_tokens} new tokens",
            "shorten --prompt or lower --max-new-tokens",
        )
        text, _, cache = self.generator.prefill([(ids, np.zeros(len(ids), bool))], max_new_tokens)
        return self._text(self._text_decoder(cache, text, max_new_tokens, sampling, seed), on_text)

    def _code_frames(self, prompt, frames, *, guidance=3.0, sampling=SAMPLED, seed=0) -> Iterator[np.ndarray]:
        """Codes [h, w] of each frame generated from `prompt` as it is produced (see `generate_codes`)."""
        cond = self.codec.encode_pieces(fmt.video_request(prompt))
        rows = [cond] + ([self.codec.encode_pieces(fmt.video_request(""))] if guidance is not None else [])
        per_frame = self.frame_tokens()
        self._check_length(
            len(cond) + frames * per_frame,
            f"prompt + {frames} frames of {per_frame} tokens",
            "generate fewer --frames or shorten --prompt",
        )
        prompts = [(np.asarray(r), np.zeros(len(r), bool)) for r in rows]
        _, vision, cache = self.generator.prefill(prompts, frames * per_frame)
        h, w = self.vqgan.code_shape
        decoder = VisionDecoder(
            self.generator, cache, vision, frames, h * w, self.vocab.n_codes, sampling, guidance, seed
        )
        for codes in decoder:
            yield codes[0].reshape(h, w)

    def generate_codes(
        self,
        prompt: str,
        frames: int = 1,
        *,
        guidance: float | None = 3.0,
        sampling: Sampling = SAMPLED,
        seed: int = 0,
    ) -> np.ndarray:
        """VQGAN codes [frames, h, w] generated from a text prompt `<s>{prompt}<vision>` (an image when frames
        is 1), a frame per jitted call. With `guidance`, classifier-free guidance against the unconditional
        prompt `<s><vision>`."""
        h, w = self.vqgan.code_shape
        codes = list(self._code_frames(prompt, frames, guidance=guidance, sampling=sampling, seed=seed))
        return np.stack(codes) if codes else np.zeros((0, h, w), np.int32)

    def generate_frames(self, prompt: str, frames: int = 1, **options) -> Iterator[np.ndarray]:
        """uint8 frames [H, W, 3] one by one, each decoded by the VQGAN as soon as its codes are generated (the
        device generates the next frame meanwhile); `options` are `generate_codes`'s (guidance, sampling,
        seed)."""
        for codes in self._code_frames(prompt, frames, **options):
            yield self.vqgan.decode(codes[None])[0]

    def generate_video(
        self,
        prompt: str,
        frames: int = 1,
        *,
        on_frame: Callable[[int, np.ndarray], None] | None = None,
        **kwargs,
    ) -> np.ndarray:
        """uint8 frames [frames, H, W, 3] from a text prompt (see `generate_codes` for the arguments), each
        decoded as it is produced; `on_frame(index, frame)` receives them as they come."""
        out = []
        for frame in self.generate_frames(prompt, frames, **kwargs):
            if on_frame:
                on_frame(len(out), frame)
            out.append(frame)
        size = self.vqgan.cfg.resolution
        return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def load_model(checkpoint: str | Path, **kwargs) -> Model:
    """A `Model` from a training workdir or `lvm export` folder (see the module docstring)."""
    return Model(checkpoint, **kwargs)
