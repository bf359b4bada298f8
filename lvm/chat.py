"""`lvm chat`: talk about a video in the browser (a Gradio app over the inference API of `lvm.inference`).

    chat = Chat(load_model("runs/demo/export"), video_dir="videos/")
    app = build_app(chat)                        # the page; `serve` launches it on 127.0.0.1
    video = chat.read("videos/clip.mp4")         # decode + encode (progress), prefill the video's prefix once
    for event in chat.ask(video, "What colour was the shape?"): ...   # the answer as it is generated

`Chat` is the part without a browser: it reads a video into a `ChatVideo` (its codes, a strip of thumbnails of
the frames the model sees with their timestamps, and the prefilled `VideoContext` of its prompt prefix), answers
questions about it with `Model.answer` (streamed through its `on_text` callback, so the streamed answer is
`lvm qa`'s), and scores multiple-choice options with `Model.option_logprobs`. Every question is answered about
the video on its own (the prompt is the video-first chat template; earlier turns are not in it), so every
question reuses the one prefilled prefix. One lock serialises all model work; `Chat.cached_videos` bounds how
many prefilled caches stay in memory (the least recently used is dropped and prefilled again when asked about).

Bad input raises `ChatError` (one line for the page): an unreadable or empty file, a video with more frames than
fit the context (`TooLong.fit` is the count that fits: the page offers it), a question or option longer than
the video's budget, a path outside `--video-dir`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from lvm.data_pipeline import storage
from lvm.tokenizers import format as fmt

QUESTION_TOKENS = 32  # default budget of a question (with the prompt's closing " ASSISTANT:")
ANSWER_TOKENS = 32  # default budget of an answer (generated tokens, or the longest option)
THUMBNAILS = 48  # at most this many frames are shown in the strip, evenly over the video
THUMB_PX = 128  # smaller frames are enlarged (nearest neighbour) to this size for the strip
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".gif", ".png", ".jpg", ".jpeg", ".webp")
LISTED_VIDEOS = 2000  # at most this many files of --video-dir are offered in the picker


class ChatError(ValueError):
    """Input the page reports in one line (the server goes on serving)."""


class TooLong(ChatError):
    """More frames than fit the context; `fit` frames would (the page offers to read that many)."""

    def __init__(self, message: str, fit: int):
        super().__init__(message)
        self.fit = fit


@dataclasses.dataclass(eq=False)
class ChatVideo:
    """One browser session's video: its codes, what the page shows about it, and its prefilled prefix."""

    name: str
    codes: np.ndarray  # [T, h, w]
    room: int  # cache slots kept after the prefix for question + answer
    answer_tokens: int
    thumbnails: list[tuple[np.ndarray, str]]  # (frame, caption) of up to THUMBNAILS frames
    summary: str  # markdown: frames, tokens, share of the context, timings
    ctx: object = None  # the VideoContext while its cache is in memory (else prefilled again when asked)
    prefill_s: float = 0.0

    @property
    def question_tokens(self) -> int:
        return self.room - self.answer_tokens


@dataclasses.dataclass
class Event:
    """One step of a streamed answer: the text so far; `done` with the final answer and the timings."""

    text: str
    done: bool = False
    first_token_s: float | None = None  # from the model taking the question to the first text
    seconds: float | None = None  # the whole answer
    waited_s: float = 0.0  # waiting for the model (another session's request)
    prefilled_s: float | None = None  # the prefix had been dropped from memory and was prefilled again


def clock(seconds: float) -> str:
    """A timestamp: 7.5 -> '0:07.5', 3725 -> '1:02:05'."""
    m, s = divmod(seconds, 60)
    h, m = divmod(int(m), 60)
    if h:
        return f"{h}:{m:02d}:{int(s):02d}"
    return f"{m}:{s:04.1f}"


def resolve_in(video_dir: str, name: str) -> str:
    """The video `name` (a path relative to `video_dir`, as typed or picked) inside `video_dir` (a folder or a
    gs:// prefix); anything that leaves it (absolute paths, '..', a symlink pointing outside, another URI)
    is a ChatError."""
    name = str(name or "").strip()
    if not name:
        raise ChatError("pick or type the name of a video in the video folder")
    if (
        "\x00" in name
        or "://" in name
        or name.startswith(("/", "\\", "~"))
        or (len(name) > 1 and name[1] == ":")
    ):
        raise ChatError(f"{name!r}: give a path relative to the video folder {video_dir}")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise ChatError(f"{name!r}: a path with '..' is not allowed; videos are read only from {video_dir}")
    if storage.is_gcs(video_dir):
        return storage.join(video_dir.rstrip("/"), *parts)
    root = Path(video_dir).resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise ChatError(f"{name!r} leads outside the video folder {video_dir}")
    if not path.is_file():
        raise ChatError(f"{name!r}: no such file in the video folder {video_dir}")
    return str(path)


def list_videos(video_dir: str) -> list[str]:
    """Video and image files in `video_dir` (a folder, searched recursively, or a gs:// prefix: its files),
    as paths relative to it, sorted; at most LISTED_VIDEOS."""
    if storage.is_gcs(video_dir):
        names = storage.listdir(video_dir)
    else:
        root = Path(video_dir)
        names = []
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            names += [str((Path(folder) / f).relative_to(root)) for f in sorted(files)]
            if len(names) >= LISTED_VIDEOS:
                break
    return sorted(n for n in names if n.lower().endswith(VIDEO_SUFFIXES))[:LISTED_VIDEOS]


def probabilities(logprobs: list[float]) -> list[float]:
    """Options' log-likelihoods -> probabilities among the options."""
    x = np.asarray(logprobs, np.float64)
    p = np.exp(x - x.max())
    return (p / p.sum()).tolist()


class Chat:
    """Videos, questions and options for any number of browser sessions, on one model (one request at a time)."""

    def __init__(self, model, *, video_dir: str | None = None, cached_videos: int = 4, name: str = ""):
        if cached_videos < 1:
            raise ValueError(f"cached_videos must be at least 1, got {cached_videos}")
        self.model = model
        self.video_dir = video_dir
        self.cached_videos = cached_videos
        self.name = name
        self.lock = threading.Lock()
        self._live: collections.OrderedDict[int, ChatVideo] = collections.OrderedDict()

    # Budgets ---------------------------------------------------------------------------------------------------

    def room(self, question_tokens: int, answer_tokens: int) -> int:
        if question_tokens < 1 or answer_tokens < 1:
            raise ChatError("the question and answer budgets must be at least 1 token each")
        return int(question_tokens) + int(answer_tokens)

    def frames_that_fit(
        self, question_tokens: int = QUESTION_TOKENS, answer_tokens: int = ANSWER_TOKENS
    ) -> int:
        return self.model.frames_that_fit(self.room(question_tokens, answer_tokens))

    def question_tokens(self, question: str) -> int:
        """Tokens a question adds after the video's prefix (with the template's closing ' ASSISTANT:')."""
        one = fmt.Video(np.zeros((1, *self.model.vqgan.code_shape), np.int32))
        prompt = self.model.tokens(fmt.video_first_chat(question, one))
        return len(prompt) - len(self.model.tokens(fmt.video_first_prefix(one)))

    # Reading a video -------------------------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """A picked or typed video name -> its path or URI inside --video-dir."""
        if not self.video_dir:
            raise ChatError("no video folder: start lvm chat with --video-dir to pick videos by name")
        return resolve_in(self.video_dir, name)

    def videos(self) -> list[str]:
        return list_videos(self.video_dir) if self.video_dir else []

    def read(
        self,
        uri: str,
        *,
        name: str | None = None,
        frames: int = 0,
        fps: float = 0.0,
        question_tokens: int = QUESTION_TOKENS,
        answer_tokens: int = ANSWER_TOKENS,
        on_progress: Callable[[float, str], None] | None = None,
    ) -> ChatVideo:
        """Decode, encode and prefill a video: as many frames as fit the context with the budgets kept for the
        question and answer, evenly (`lvm qa`'s default), or `frames` evenly, or at `fps` (at most `frames`)."""
        name = name or uri.rstrip("/").rsplit("/", 1)[-1]
        room = self.room(question_tokens, answer_tokens)
        fit = self.model.frames_that_fit(room)
        context, per_frame = self.model.context, self.model.frame_tokens()
        if fit < 1:
            raise ChatError(
                f"not one frame fits the model's context of {context} tokens with {room} kept for the question "
                f"and answer ({per_frame} tokens a frame): lower the question or answer budget"
            )
        frames, fps = int(frames or 0), float(fps or 0)
        if frames < 0 or fps < 0:
            raise ChatError("frames and fps must not be negative (0: as many as fit, evenly)")
        if frames > fit:
            raise TooLong(
                f"{frames} frames do not fit the model's context of {context} tokens with {room} kept for the "
                f"question and answer ({per_frame} tokens a frame): {fit} frames do",
                fit,
            )
        if not storage.is_gcs(uri):
            if not os.path.isfile(uri):
                raise ChatError(f"{name}: no such file")
            if os.path.getsize(uri) == 0:
                raise ChatError(f"{name} is empty (0 bytes): upload a video file")
        t0 = time.perf_counter()
        with self.lock:
            waited = time.perf_counter() - t0
            codes, thumbs, info = self._decode(uri, name, frames, fps, fit, on_progress)
            read_s = time.perf_counter() - t0 - waited
            if on_progress:
                on_progress(1.0, f"prefilling {len(codes)} frames")
            t1 = time.perf_counter()
            ctx = self.model.video_context(codes, room)
            prefill_s = time.perf_counter() - t1
        video = ChatVideo(name, codes, room, int(answer_tokens), thumbs, "", ctx, prefill_s)
        video.summary = self._summary(video, info, read_s, waited)
        with self.lock:
            self._keep(video)
        return video

    def _decode(self, uri, name, frames, fps, fit, on_progress):
        """(codes [T, h, w], thumbnails, VideoInfo) of `uri` sampled as `read` describes, as `Model.read_video`
        samples and encodes it (the same frames and codes for the same settings), reporting progress."""
        from lvm.data_pipeline.decode import DecodeError, Decoder, TooManyFrames, fps_within

        if fps:  # at `fps`, at most `frames`; else `frames` (or as many as fit) evenly
            cfg = self.model.decode_config(fps, None, frames or None, fit)
        else:
            cfg = self.model.decode_config(None, frames or fit, None, fit)
        thumbs, done, keep = [], 0, None

        def on_chunk(chunk, _codes, info):
            nonlocal done, keep
            total = info.sampled if info else len(chunk.frames)
            if keep is None:
                keep = set(np.linspace(0, total - 1, min(total, THUMBNAILS)).round().astype(int).tolist())
            for k, (frame, t) in enumerate(zip(chunk.frames, chunk.timestamps, strict=True)):
                if done + k in keep:
                    thumbs.append((_enlarge(frame), f"#{done + k + 1} · {clock(float(t))}"))
            done += len(chunk.frames)
            if on_progress:
                on_progress(done / max(total, 1), f"decoding and encoding: {done} of {total} frames")

        if on_progress:
            on_progress(0.0, f"opening {name}")
        try:
            with Decoder(cfg) as decoder:
                codes = self.model.encode_frames(decoder, uri, on_chunk)
                info = decoder.info
        except TooManyFrames as err:
            length = clock(err.frames / err.fps)
            raise TooLong(
                f"{name} ({length}) gives {err.sampled} frames at {fps:g} fps; {fit} fit the model's context "
                f"with the question and answer budgets: read {fit} frames evenly, or use "
                f"{fps_within(err.frames, err.fps, fit):g} fps",
                fit,
            ) from None
        except DecodeError as err:
            raise ChatError(f"cannot read {name} as a video: {err}") from None
        except storage.StorageError as err:
            raise ChatError(f"cannot read {name}: {err}") from None
        if codes is None:
            raise ChatError(f"no frames could be sampled from {name}")
        return codes, thumbs, info

    def _summary(self, video: ChatVideo, info, read_s: float, waited_s: float) -> str:
        n, context, per_frame = len(video.codes), self.model.context, self.model.frame_tokens()
        prefix = fmt.prefix_overhead(self.model.codec) + n * per_frame
        if info is not None and info.frames > 1 and info.fps > 0:
            seconds = info.frames / info.fps
            every = f", one every {seconds / n:.2g} s" if n > 1 else ""
            source = f"{n} of its {info.frames} frames ({clock(seconds)} at {info.fps:g} fps{every})"
        else:
            source = f"{n} frame{'s' * (n != 1)}"
        waited = f" after waiting {waited_s:.1f} s for the model," if waited_s >= 0.1 else ""
        return (
            f"**{video.name}**: the model sees {source}: {n * per_frame} video tokens ({per_frame} a frame); "
            f"with the prompt {prefix} tokens, **{prefix / context:.0%} of the {context}-token context**, and "
            f"{video.room} kept for the question ({video.question_tokens}) and answer ({video.answer_tokens}). "
            f"Read{waited} in {read_s:.1f} s, prefilled once in {video.prefill_s:.2f} s."
        )

    # Caches ----------------------------------------------------------------------------------------------------

    def _keep(self, video: ChatVideo) -> None:
        """Mark `video`'s cache as the most recently used; drop the oldest beyond `cached_videos` (lock held)."""
        self._live[id(video)] = video
        self._live.move_to_end(id(video))
        while len(self._live) > self.cached_videos:
            _, old = self._live.popitem(last=False)
            old.ctx = None

    def _context(self, video: ChatVideo) -> float | None:
        """Make sure `video`'s prefix is prefilled (lock held); the seconds it took when it had to be."""
        took = None
        if video.ctx is None:
            t0 = time.perf_counter()
            video.ctx = self.model.video_context(video.codes, video.room)
            took = time.perf_counter() - t0
        self._keep(video)
        return took

    def forget(self, video: ChatVideo | None) -> None:
        """Free a closed session's cache."""
        if isinstance(video, ChatVideo):
            with self.lock:
                self._live.pop(id(video), None)
                video.ctx = None

    # Questions -------------------------------------------------------------------------------------------------

    def check_question(self, video: ChatVideo | None, question: str, extra: int | None = None) -> str:
        """The question, stripped, when it can be asked about `video` with `extra` tokens after it (the answer
        budget, or the longest option); else a ChatError saying what to change."""
        if video is None:
            raise ChatError("upload a video (or pick one) first")
        question = (question or "").strip()
        if not question:
            raise ChatError("type a question")
        extra = video.answer_tokens if extra is None else extra
        n = self.question_tokens(question)
        if n + extra > video.room:
            raise ChatError(
                f"the question is {n} tokens long (with the prompt's end) and, with {extra} for the answer, needs "
                f"{n + extra} of the {video.room} this video keeps for question and answer: shorten it, or read "
                "the video again with a larger question budget (then fewer frames fit)"
            )
        return question

    def ask(self, video: ChatVideo | None, question: str) -> Iterator[Event]:
        """The answer to `question` as it is generated (`Model.answer`, greedy); the last event is `done`."""
        question = self.check_question(video, question)
        events: queue.Queue = queue.Queue()
        asked = time.perf_counter()

        def work():
            try:
                with self.lock:
                    began = time.perf_counter()
                    prefilled = self._context(video)
                    events.put(("start", (began - asked, prefilled, time.perf_counter())))
                    answer = self.model.answer(
                        video.ctx,
                        question,
                        max_new_tokens=video.answer_tokens,
                        on_text=lambda text: events.put(("text", (text, time.perf_counter()))),
                    )
                events.put(("done", (answer, time.perf_counter())))
            except BaseException as err:  # handed to the page's thread
                events.put(("error", err))

        threading.Thread(target=work, daemon=True, name="lvm-chat-answer").start()
        text, first, start, waited, prefilled = "", None, asked, 0.0, None
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            if kind == "start":
                waited, prefilled, start = payload
            elif kind == "text":
                chunk, at = payload
                first = at - start if first is None else first
                text += chunk
                yield Event(text, first_token_s=first, waited_s=waited, prefilled_s=prefilled)
            else:
                answer, at = payload
                yield Event(answer, True, first, at - start, waited, prefilled)
                return

    def score(self, video: ChatVideo | None, question: str, options: list[str]) -> list[float]:
        """Probabilities of `options` (among them) as the answer to `question`, by their log-likelihood."""
        options = [o.strip() for o in options if o.strip()]
        if len(options) < 2:
            raise ChatError("give at least two options, one per line")
        longest = max(len(self.model.codec.encode(fmt.answer_text(o), continuation=True)) for o in options)
        question = self.check_question(video, question, extra=longest)
        with self.lock:
            self._context(video)
            return probabilities(self.model.option_logprobs(video.ctx, question, options))


def _enlarge(frame: np.ndarray) -> np.ndarray:
    """A frame for the strip: enlarged by an integer factor (nearest neighbour) when it is smaller than THUMB_PX."""
    k = max(1, THUMB_PX // max(frame.shape[:2]))
    return np.repeat(np.repeat(frame, k, axis=0), k, axis=1) if k > 1 else frame


def describe(err: BaseException) -> str:
    """An exception as the page shows it: bad input in its own words, anything else named as a server error
    (the traceback goes to the server's stderr)."""
    if isinstance(err, (ValueError, FileNotFoundError, storage.StorageError)):
        return str(err)
    traceback.print_exception(err, file=sys.stderr)
    return f"internal error ({type(err).__name__}: {err}); the server log has the details"


# The page ----------------------------------------------------------------------------------------------------

CSS = """
#frames .thumbnail-item { image-rendering: pixelated; }
#video-status, #chat-status { min-height: 1.5em; }
"""


def _warn(message: str) -> str:
    return f"⚠️ {message}"


def build_app(chat: Chat):
    """The page: a video (upload or --video-dir), the strip of frames the model sees, and a chat."""
    import gradio as gr
    import pandas as pd

    m = chat.model
    h, w = m.vqgan.code_shape
    header = (
        f"## lvm chat{' · ' + chat.name if chat.name else ''}\n"
        f"Context {m.context} tokens; a frame is {m.frame_tokens()} tokens ({h}x{w} codes). Upload a video or "
        "pick one, then ask about it: each question is answered about the video on its own (earlier turns are "
        "not part of the prompt), reusing the video's prefilled prefix."
    )

    with gr.Blocks(title="lvm chat", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        video = gr.State(None, delete_callback=chat.forget)
        source = gr.State(None)  # (uri, name) of the last video asked for (read again with fewer frames)
        offered = gr.State(0)  # the frames that fit, offered after a video with too many
        gr.Markdown(header)
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="Upload a video", type="filepath", elem_id="upload", height=100)
                if chat.video_dir:
                    pick = gr.Dropdown(
                        choices=chat.videos(),
                        value=None,
                        allow_custom_value=True,
                        label=f"or pick / type a video in {chat.video_dir}",
                        elem_id="pick",
                    )
                    with gr.Row():
                        read_pick = gr.Button("Read this video", elem_id="read-pick", size="sm", scale=3)
                        refresh = gr.Button("↻ list again", size="sm", scale=1)
                strip = gr.Gallery(label="Frames the model sees", columns=6, height=190, object_fit="contain",
                                   elem_id="frames", allow_preview=True, format="png", fit_columns=False)  # fmt: skip
                video_status = gr.Markdown(elem_id="video-status")
                fewer = gr.Button(visible=False, elem_id="fewer-frames", size="sm")
                with gr.Accordion("Frames and budgets", open=False, elem_id="budgets"):
                    frames = gr.Number(0, label="frames (0: as many as fit, evenly)", precision=0, minimum=0,
                                       elem_id="frames-count")  # fmt: skip
                    fps = gr.Number(
                        0, label="or frames per second (0: spread evenly)", minimum=0, elem_id="fps"
                    )
                    q_budget = gr.Slider(4, 1024, QUESTION_TOKENS, step=4, label="question budget (tokens)")
                    a_budget = gr.Slider(1, 1024, ANSWER_TOKENS, step=1, label="answer budget (tokens)")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=360)
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the video", show_label=False, scale=5,
                                          elem_id="question", submit_btn=False)  # fmt: skip
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                chat_status = gr.Markdown(elem_id="chat-status")
                multiple = gr.Checkbox(False, label="Multiple choice: score options instead of generating",
                                       elem_id="multiple-choice")  # fmt: skip
                options = gr.Textbox(label="Options, one per line", lines=3, visible=False, elem_id="options")
                bars = gr.BarPlot(None, x="option", y="probability", y_lim=[0, 1], visible=False, height=200,
                                  label="Probability of each option", elem_id="bars")  # fmt: skip

        tracker = gr.Progress()  # Gradio hands a handler with this default its event's progress bar

        def read(src, frames_n, fps_v, q_n, a_n, current, progress=tracker):
            """Outputs: video, video_status, strip, fewer, offered, chatbot, chat_status."""
            if src is None:
                return current, gr.skip(), gr.skip(), gr.Button(visible=False), 0, gr.skip(), gr.skip()
            uri, name = src
            try:
                new = chat.read(uri, name=name, frames=frames_n, fps=fps_v, question_tokens=q_n,
                                answer_tokens=a_n, on_progress=lambda f, d: progress(f, desc=d))  # fmt: skip
            except Exception as err:  # noqa: BLE001 - every failure becomes a message; the server goes on
                still = f" Still talking about **{current.name}**." if current is not None else ""
                fit = err.fit if isinstance(err, TooLong) else 0
                offer = gr.Button(f"Read {fit} frames evenly instead", visible=bool(fit))
                return current, _warn(describe(err)) + still, gr.skip(), offer, fit, gr.skip(), gr.skip()
            chat.forget(current)
            return new, new.summary, new.thumbnails, gr.Button(visible=False), 0, [], ""

        def from_upload(path):
            return None if not path else (path, Path(path).name)

        def from_pick(name):
            try:
                return (chat.resolve(name), str(name).strip()), ""
            except ChatError as err:
                return None, _warn(str(err))

        inputs = [source, frames, fps, q_budget, a_budget, video]
        outputs = [video, video_status, strip, fewer, offered, chatbot, chat_status]
        model_work = dict(concurrency_id="model", concurrency_limit=1)
        upload.upload(from_upload, upload, source, queue=False).then(read, inputs, outputs, **model_work)
        if chat.video_dir:
            read_pick.click(from_pick, pick, [source, video_status], queue=False).then(
                read, inputs, outputs, **model_work
            )
            refresh.click(lambda: gr.Dropdown(choices=chat.videos()), None, pick, queue=False)

        fewer.click(lambda fit: (fit, 0), offered, [frames, fps], queue=False).then(
            read, inputs, outputs, **model_work
        )

        def answer(q, history, is_multiple, option_text, current):
            """Outputs: chatbot, question, chat_status, bars."""
            history = list(history or [])
            try:
                if is_multiple:
                    opts = [o.strip() for o in (option_text or "").splitlines() if o.strip()]
                    t0 = time.perf_counter()
                    probs = chat.score(current, q, opts)
                    best = int(np.argmax(probs))
                    listed = " · ".join(f"{o} {p:.0%}" for o, p in zip(opts, probs, strict=True))
                    history += [{"role": "user", "content": q.strip()},
                                {"role": "assistant", "content": f"{opts[best]} ({listed})"}]  # fmt: skip
                    table = pd.DataFrame({"option": opts, "probability": probs})
                    took = f"options scored in {time.perf_counter() - t0:.2f} s (video prefix reused)"
                    yield history, "", took, gr.BarPlot(table, visible=True)
                    return
                checked = chat.check_question(current, q)
                history.append({"role": "user", "content": checked})
                history.append({"role": "assistant", "content": ""})
                for event in chat.ask(current, checked):
                    history[-1] = {"role": "assistant", "content": event.text}
                    yield history, "", _timing(event), gr.skip()
            except Exception as err:  # noqa: BLE001 - the message goes to the page; the server goes on
                if history and history[-1] == {"role": "assistant", "content": ""}:
                    history = history[:-2]
                yield history, gr.skip(), _warn(describe(err)), gr.skip()

        asked = dict(fn=answer, inputs=[question, chatbot, multiple, options, video],
                     outputs=[chatbot, question, chat_status, bars], **model_work)  # fmt: skip
        send.click(**asked)
        question.submit(**asked)
        multiple.change(
            lambda on: (gr.Textbox(visible=on), gr.BarPlot(visible=on)),
            multiple,
            [options, bars],
            queue=False,
        )
    return app


def _timing(event: Event) -> str:
    """The chat's status line for a streamed answer."""
    parts = []
    if event.first_token_s is not None:
        parts.append(f"first token after {event.first_token_s * 1000:.0f} ms")
    if event.done:
        parts.append(f"answered in {event.seconds:.2f} s")
    if event.prefilled_s is not None:
        parts.append(f"video prefix prefilled again in {event.prefilled_s:.2f} s (it had left memory)")
    else:
        parts.append("video prefix reused")
    if event.waited_s >= 0.1:
        parts.append(f"waited {event.waited_s:.1f} s for the model")
    return ("generating: " if not event.done else "") + " · ".join(parts)


def _wait_until_served(app, timeout_s: float = 120.0) -> None:
    """Wait for the page to answer on its address (a loaded machine may take seconds)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(app.local_url, timeout=10) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            app.close()
            raise RuntimeError(f"the chat page at {app.local_url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


def serve(
    chat: Chat,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_mb: float = 512,
    block: bool = True,
    quiet: bool = False,
):
    """Launch the page on host:port (never a public share link); with `block=False` return the running app
    (`app.local_url`, `app.close()`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not os.environ.get("GRADIO_TEMP_DIR"):
        # Uploads in a folder of this process's own: Gradio names an upload by its content's hash in one shared
        # folder and deletes an app's files when it closes, so another server (or an earlier one's old copy,
        # swept by age) would take away a video this one is still reading.
        os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="lvm-chat-uploads-")
    app = build_app(chat)
    app.queue(default_concurrency_limit=1, max_size=64)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            max_file_size=f"{int(max_upload_mb * 1024)}kb",
            prevent_thread_lock=True,
            quiet=True,
            show_error=True,
            enable_monitoring=False,
            run_history=False,  # no record of anyone's questions, in the browser or elsewhere
            css=CSS,
            # Gradio's own check that the page answers gives up after one 3-s request (and then asks for a
            # public share link); on a loaded machine that fails, so the page is checked below instead.
            _frontend=False,
        )
    except OSError:  # Gradio's "Cannot find empty port", or a port not ours to take
        raise ValueError(
            f"cannot listen on {host}:{port} (in use, or not allowed): pass another --port"
        ) from None
    _wait_until_served(app)
    if not quiet:
        print(f"lvm chat: serving on {app.local_url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    if block:
        app.block_thread()
    return app
