"""The interleaved text/vision token format: the contract between the tokenizers, the data pipeline and the model.

A document is a list of segments. `build` turns it into a `TokenRecord` of three aligned arrays; `parse` turns a
record back into the document. Layout of one video of T frames (LWM-compatible):

    text ids of "<vision>" | f_0 codes, <eof> | ... | f_{T-1} codes, <eov> | text ids of "</vision>"

- Vision ids live in the vision vocabulary (`VisionVocab`): codes 0..n_codes-1, `<eof>` = n_codes,
  `<eov>` = n_codes + 1, size n_codes + 256 reserved (8448 for 8192 codes). Text ids live in the text vocabulary.
  `vision_mask[i]` says which table `tokens[i]` indexes (the model keeps separate embeddings and heads).
- `<vision>` and `</vision>` are ordinary text tokens, always encoded as continuations (no word-start marker,
  even at the start of a sequence); they carry the video's loss weight so a model learns to
  open and close videos when the video itself is a target.
- A single image is a video of one frame, closed by `<eov>`.
- `loss_mask[i]` is the weight of `tokens[i]` *as a prediction target* (the trainer shifts by one). BOS always
  has weight 0; EOS takes the weight of the last non-empty segment (0 if none).

Every prompt is built here too (the chat `TEMPLATES`, later turns, question-only and text prompts), and the token
counts that size a video to a context (`tokens_per_frame`, `prefix_overhead`, `frames_that_fit`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

VISION_START = "<vision>"
VISION_END = "</vision>"
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class VisionVocab:
    """Vision-token ids: `n_codes` VQGAN codes, then `<eof>`, `<eov>`, then reserved ids up to `size`."""

    n_codes: int = 8192
    n_reserved: int = 256

    def __post_init__(self):
        if self.n_codes < 1 or self.n_reserved < 2:
            raise ValueError(f"need n_codes >= 1 and n_reserved >= 2 (for <eof>, <eov>), got {self}")

    @property
    def eof(self) -> int:
        return self.n_codes

    @property
    def eov(self) -> int:
        return self.n_codes + 1

    @property
    def size(self) -> int:
        return self.n_codes + self.n_reserved


class TextCodec(Protocol):
    """What the format needs from a text tokenizer (`lvm.tokenizers.text.SentencePieceTokenizer` is one).

    `encode(text, continuation)` must not add BOS/EOS; `continuation=True` means the text directly continues
    earlier text of the same sequence (no word-start marker is added at its start). `decode` inverts `encode`.
    """

    bos_id: int
    eos_id: int

    def encode(self, text: str, continuation: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], continuation: bool = False) -> str: ...


@dataclasses.dataclass(frozen=True)
class Text:
    """A run of text; `loss` weights its tokens as targets (prompt 0, answer 1, pre-training text 1)."""

    text: str
    loss: float = 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class Video:
    """A video of per-frame VQGAN codes `[frames, ...]` (e.g. `[T, 16, 16]`); `loss` weights its tokens."""

    codes: np.ndarray
    loss: float = 0.0

    def __post_init__(self):
        codes = np.asarray(self.codes)
        if codes.ndim < 2 or codes.shape[0] == 0 or codes[0].size == 0:
            raise ValueError(f"video codes must be [frames >= 1, codes...], got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"video codes must be integers, got dtype {codes.dtype}")
        object.__setattr__(self, "codes", codes)

    def __eq__(self, other):
        return (
            isinstance(other, Video)
            and self.loss == other.loss
            and self.codes.shape == other.codes.shape
            and bool(np.array_equal(self.codes, other.codes))
        )

    __hash__ = None


def image(codes: np.ndarray, loss: float = 0.0) -> Video:
    """A single image `[h, w]` (or flat `[n]`) of codes as a one-frame video (closed by `<eov>`)."""
    return Video(np.asarray(codes)[None], loss)


Segment = Text | Video


@dataclasses.dataclass(frozen=True)
class Document:
    """Segments plus whether the sequence starts with BOS and ends with EOS."""

    segments: tuple[Segment, ...]
    bos: bool = True
    eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "segments", tuple(self.segments))

    def canonical(self) -> Document:
        """The form `parse` returns: empty text dropped, neighbouring texts of equal loss merged."""
        out: list[Segment] = []
        for seg in self.segments:
            if isinstance(seg, Text):
                if not seg.text:
                    continue
                if out and isinstance(out[-1], Text) and out[-1].loss == seg.loss:
                    out[-1] = Text(out[-1].text + seg.text, seg.loss)
                    continue
            out.append(seg)
        return Document(tuple(out), self.bos, self.eos)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenRecord:
    """Aligned arrays `[seq]`: token ids (text or vision vocabulary), vision mask, loss weight per target."""

    tokens: np.ndarray  # int32 [seq]
    vision_mask: np.ndarray  # bool [seq]
    loss_mask: np.ndarray  # float32 [seq]

    def __len__(self) -> int:
        return len(self.tokens)


def build(doc: Document, codec: TextCodec, vocab: VisionVocab = VisionVocab()) -> TokenRecord:
    """Token ids, vision mask and loss mask of a document (see the module docstring for the layout)."""
    tokens: list[np.ndarray] = []
    vision: list[np.ndarray] = []
    loss: list[np.ndarray] = []
    started = False  # whether text has been emitted, i.e. the next text continues the sequence

    def emit(ids, is_vision: bool, weight: float):
        ids = np.asarray(ids, np.int32).reshape(-1)
        tokens.append(ids)
        vision.append(np.full(ids.shape, is_vision))
        loss.append(np.full(ids.shape, weight, np.float32))

    def text(s: str, weight: float, marker: bool = False):
        nonlocal started
        emit(codec.encode(s, continuation=started or marker), False, weight)
        started = True

    if doc.bos:
        emit([codec.bos_id], False, 0.0)
    last_weight = 0.0
    for seg in doc.segments:
        if isinstance(seg, Text):
            if not seg.text:
                continue
            text(seg.text, seg.loss)
        elif isinstance(seg, Video):
            text(VISION_START, seg.loss, marker=True)
            emit(_video_ids(seg.codes, vocab), True, seg.loss)
            text(VISION_END, seg.loss, marker=True)
        else:
            raise ValueError(f"unknown segment type {type(seg).__name__}; expected Text or Video")
        last_weight = seg.loss
    if doc.eos:
        emit([codec.eos_id], False, last_weight)
    if not tokens:
        return TokenRecord(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(0, np.float32))
    return TokenRecord(np.concatenate(tokens), np.concatenate(vision), np.concatenate(loss))


def _video_ids(codes: np.ndarray, vocab: VisionVocab) -> np.ndarray:
    flat = codes.reshape(codes.shape[0], -1)  # [frames, codes_per_frame]
    if flat.min() < 0 or flat.max() >= vocab.n_codes:
        raise ValueError(f"video codes must lie in [0, {vocab.n_codes}), got [{flat.min()}, {flat.max()}]")
    closers = np.full((flat.shape[0], 1), vocab.eof, np.int32)
    closers[-1] = vocab.eov
    return np.concatenate([flat.astype(np.int32), closers], axis=1).reshape(-1)


def parse(
    record: TokenRecord,
    codec: TextCodec,
    vocab: VisionVocab = VisionVocab(),
    frame_shape: tuple[int, ...] | None = None,
) -> Document:
    """The document a record was built from, in canonical form; video codes come back as `[T, *frame_shape]`.

    Text is split into segments where its loss weight changes. Raises ValueError on a malformed record.
    """
    tokens = np.asarray(record.tokens)
    is_vision = np.asarray(record.vision_mask, bool)
    weights = np.asarray(record.loss_mask, np.float32)
    if not (tokens.shape == is_vision.shape == weights.shape) or tokens.ndim != 1:
        raise ValueError("record arrays must be 1-D and of equal length")
    start_ids = codec.encode(VISION_START, continuation=True)
    end_ids = codec.encode(VISION_END, continuation=True)
    n = len(tokens)
    bos = n > 0 and not is_vision[0] and tokens[0] == codec.bos_id
    eos = n > int(bos) and not is_vision[-1] and tokens[-1] == codec.eos_id
    lo, hi = int(bos), n - int(eos)

    # Vision runs, widened to include their text wrappers.
    runs = []
    i = lo
    while i < hi:
        if not is_vision[i]:
            i += 1
            continue
        j = i
        while j < hi and is_vision[j]:
            j += 1
        a, b = i - len(start_ids), j + len(end_ids)
        if a < lo or b > hi or list(tokens[a:i]) != start_ids or list(tokens[j:b]) != end_ids:
            raise ValueError(
                f"vision tokens at [{i}, {j}) are not wrapped in {VISION_START} ... {VISION_END}"
            )
        runs.append((a, i, j, b))
        i = j

    segments: list[Segment] = []
    started = False

    def add_text(a: int, b: int):
        nonlocal started
        while a < b:  # split where the loss weight changes
            c = a + 1
            while c < b and weights[c] == weights[a]:
                c += 1
            segments.append(Text(codec.decode(tokens[a:c].tolist(), continuation=started), float(weights[a])))
            started = True
            a = c

    pos = lo
    for a, i, j, b in runs:
        add_text(pos, a)
        segments.append(Video(_parse_video(tokens[i:j], vocab, frame_shape), float(weights[i])))
        started = True
        pos = b
    add_text(pos, hi)
    return Document(tuple(segments), bool(bos), bool(eos)).canonical()


def _parse_video(ids: np.ndarray, vocab: VisionVocab, frame_shape) -> np.ndarray:
    if ids[-1] != vocab.eov:
        raise ValueError("a video must end with <eov>")
    ends = np.flatnonzero((ids == vocab.eof) | (ids == vocab.eov))
    if ids[ends[:-1]].tolist() != [vocab.eof] * (len(ends) - 1):
        raise ValueError("<eov> may only close the last frame of a video")
    per_frame = ends[0]
    if per_frame == 0 or np.any(np.diff(ends) != per_frame + 1):
        raise ValueError("all frames of a video must have the same, non-zero number of codes")
    codes = ids.reshape(len(ends), per_frame + 1)[:, :-1]
    if codes.max() >= vocab.n_codes:
        raise ValueError(f"vision id {codes.max()} inside a frame is not a code (< {vocab.n_codes})")
    return codes.reshape(len(ends), *(frame_shape or (per_frame,)))


# Chat templates and token counts --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """One turn around a video: `<s>{before}<vision>...</vision>{after}`, then ` {answer}</s>` when answered.
    `before` and `after` are format strings of `system` and `question`."""

    before: str
    after: str

    def texts(self, question: str, system: str = SYSTEM_PROMPT) -> tuple[str, str]:
        """The texts before and after the video."""
        return (
            self.before.format(system=system, question=question),
            self.after.format(system=system, question=question),
        )


TEMPLATES = {
    # the video before the question: every question about a video shares one cacheable prefix
    "video_first": ChatTemplate("{system} USER: ", "\n{question} ASSISTANT:"),
    # LWM's: the question before the video
    "lwm": ChatTemplate("{system} USER: {question}\n", " ASSISTANT:"),
}


def answer_text(answer: str) -> str:
    """An answer as it follows `ASSISTANT:` (the text whose tokens are the targets, or whose likelihood is
    scored)."""
    return f" {answer}"


def chat(
    question: str,
    video: Video,
    answer: str | None = None,
    *,
    template: str = "video_first",
    system: str = SYSTEM_PROMPT,
    answer_loss: float = 1.0,
) -> Document:
    """One question about a video in `TEMPLATES[template]`, then the answer weighted `answer_loss` and EOS.
    The video keeps its loss weight (0 by default: part of the prompt).

    With `answer=None` the document ends after `ASSISTANT:` (a generation prompt, no EOS).
    """
    before, after = TEMPLATES[template].texts(question, system)
    prompt = (Text(before), video, Text(after))
    if answer is None:
        return Document(prompt, bos=True, eos=False)
    return Document((*prompt, Text(answer_text(answer), answer_loss)), bos=True, eos=True)


def lwm_chat(question: str, video: Video, answer: str | None = None, **kwargs) -> Document:
    """`chat` in LWM's template, the question before the video:
    `<s>{system} USER: {question}\\n<vision>...</vision> ASSISTANT: {answer}</s>`."""
    return chat(question, video, answer, template="lwm", **kwargs)


def video_first_chat(question: str, video: Video, answer: str | None = None, **kwargs) -> Document:
    """`chat` in the video-first template:
    `<s>{system} USER: <vision>...</vision>\\n{question} ASSISTANT: {answer}</s>`.

    The tokens of `video_first_prefix(video)` are exactly the first tokens of this document for any question.
    """
    return chat(question, video, answer, template="video_first", **kwargs)


def video_first_prefix(video: Video, system: str = SYSTEM_PROMPT) -> Document:
    """The question-independent prefix of `video_first_chat`, `<s>{system} USER: <vision>...</vision>` (build
    it once, cache its keys and values)."""
    before, _ = TEMPLATES["video_first"].texts("", system)
    return Document((Text(before), video), bos=True, eos=False)


def later_turn(question: str, answer: str, answer_loss: float = 1.0) -> tuple[Text, Text]:
    """A turn after the first of a conversation, the same in every template: ` USER: {question} ASSISTANT:`,
    then the answer weighted `answer_loss`."""
    return Text(f" USER: {question} ASSISTANT:"), Text(answer_text(answer), answer_loss)


def conversation(
    video: Video,
    turns: Sequence[tuple[str, str]],
    *,
    template: str = "video_first",
    system: str = SYSTEM_PROMPT,
    answer_loss: float = 1.0,
) -> Document:
    """(question, answer) turns about one video: the first in `TEMPLATES[template]` (`chat`), the others as
    `later_turn`s, then EOS. The video keeps its loss weight."""
    if not turns:
        raise ValueError("a conversation needs at least one (question, answer) turn")
    (question, answer), *later = turns
    first = chat(question, video, answer, template=template, system=system, answer_loss=answer_loss)
    segments = [*first.segments]
    for question, answer in later:
        segments += later_turn(question, answer, answer_loss)
    return Document(tuple(segments), bos=True, eos=True)


def text_chat(
    context: str, question: str, *, template: str = "video_first", system: str = SYSTEM_PROMPT
) -> str:
    """The generation prompt of `TEMPLATES[template]` as one string, with the text `context` in the video's
    place (e.g. a needle-in-a-haystack text), without BOS."""
    before, after = TEMPLATES[template].texts(question, system)
    return before + context + after


def question_only_prompt(
    question: str, *, template: str = "video_first", system: str = SYSTEM_PROMPT
) -> Document:
    """The generation prompt of `TEMPLATES[template]` without its video, for video-first
    `<s>{system} USER: \\n{question} ASSISTANT:`: a baseline of what the question alone implies."""
    return Document((Text(text_chat("", question, template=template, system=system)),), bos=True, eos=False)


def video_request(prompt: str) -> list[str]:
    """The pieces of the prompt that asks for video after a text: `<s>{prompt}<vision>` (the codec adds BOS);
    `video_request("")` is the unconditional prompt classifier-free guidance compares against."""
    return [prompt, VISION_START]


def template_words(system: str = SYSTEM_PROMPT) -> str:
    """The words every template adds (the system prompt and the role markers), for a text tokenizer's training
    text."""
    return f"{system} USER: ASSISTANT:"


def tokens_per_frame(code_shape: Sequence[int]) -> int:
    """Tokens of one frame of `code_shape` codes (e.g. (16, 16)): the codes and the `<eof>` or `<eov>` closing
    it."""
    return int(np.prod(code_shape)) + 1


def prefix_overhead(codec: TextCodec, system: str = SYSTEM_PROMPT) -> int:
    """Tokens of `video_first_prefix` besides the video's: BOS, `{system} USER: `, `<vision>` and `</vision>`.

    A video-first prompt of T frames is `prefix_overhead + T * tokens_per_frame` tokens up to the question.
    """
    one_code = Video(np.zeros((1, 1), np.int32))
    return len(build(video_first_prefix(one_code, system), codec)) - tokens_per_frame((1,))


def frames_that_fit(
    context: int, reserve: int, code_shape: Sequence[int], codec: TextCodec, system: str = SYSTEM_PROMPT
) -> int:
    """Frames of `code_shape` codes a video-first prompt of at most `context` tokens holds with `reserve`
    tokens left after the video for the question and answer (0 when not even one fits)."""
    room = context - prefix_overhead(codec, system) - reserve
    return max(0, room // tokens_per_frame(code_shape))
