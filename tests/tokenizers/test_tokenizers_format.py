"""The interleaved token format: layout, masks, templates, and build -> parse round trips over random documents."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvm.tokenizers import format as fmt


class CharCodec:
    """A reference text codec: one id per character (ord + 3), BOS = 1, EOS = 2."""

    bos_id, eos_id = 1, 2

    def encode(self, text, continuation=False):
        return [ord(c) + 3 for c in text]

    def decode(self, ids, continuation=False):
        return "".join(chr(i - 3) for i in ids)


CODEC = CharCodec()
VOCAB = fmt.VisionVocab(n_codes=16, n_reserved=4)


def test_vision_vocab_matches_lwm():
    v = fmt.VisionVocab()
    assert (v.n_codes, v.eof, v.eov, v.size) == (8192, 8192, 8193, 8448)


def test_video_layout_masks_and_weights():
    codes = np.arange(12).reshape(3, 2, 2) % 16  # 3 frames of 2x2 codes
    doc = fmt.Document((fmt.Text("hi"), fmt.Video(codes, loss=1.0), fmt.Text("!", 0.5)), bos=True, eos=True)
    rec = fmt.build(doc, CODEC, VOCAB)
    start, end = CODEC.encode("<vision>"), CODEC.encode("</vision>")
    vision = [0, 1, 2, 3, 16, 4, 5, 6, 7, 16, 8, 9, 10, 11, 17]  # <eof> = 16 after frames, <eov> = 17 last
    expected = [1, *CODEC.encode("hi"), *start, *vision, *end, *CODEC.encode("!"), 2]
    assert rec.tokens.tolist() == expected
    n_before = 1 + 2 + len(start)
    assert rec.vision_mask.tolist() == [False] * n_before + [True] * 15 + [False] * (len(end) + 2)
    weights = [0.0] * 3 + [1.0] * (len(start) + 15 + len(end)) + [0.5, 0.5]  # EOS takes the last weight
    assert rec.loss_mask.tolist() == weights
    assert rec.tokens.dtype == np.int32 and rec.loss_mask.dtype == np.float32


def test_single_image_is_one_frame_closed_by_eov():
    rec = fmt.build(fmt.Document((fmt.image(np.array([[3, 4], [5, 6]])),), bos=False), CODEC, VOCAB)
    vision = rec.tokens[rec.vision_mask].tolist()
    assert vision == [3, 4, 5, 6, VOCAB.eov] and VOCAB.eof not in vision
    doc = fmt.parse(rec, CODEC, VOCAB, frame_shape=(2, 2))
    assert doc.segments[0].codes.shape == (1, 2, 2)


def _render(rec):
    """The text between BOS and EOS of a CharCodec record, one '#' per vision token."""
    pairs = zip(rec.tokens[1:-1], rec.vision_mask[1:-1], strict=True)
    return "".join("#" if v else chr(t - 3) for t, v in pairs)


def test_lwm_chat_template_and_masks():
    video = fmt.Video(np.zeros((2, 4), np.int32))
    doc = fmt.lwm_chat("What happens?", video, answer="A dog runs.")
    rec = fmt.build(doc, CODEC, VOCAB)
    assert (
        _render(rec)
        == "You are a helpful assistant. USER: What happens?\n<vision>##########</vision> ASSISTANT: A dog runs."
    )
    assert rec.tokens[0] == CODEC.bos_id and rec.tokens[-1] == CODEC.eos_id
    n_answer = len(" A dog runs.") + 1  # answer and EOS are the only targets
    assert rec.loss_mask.tolist() == [0.0] * (len(rec) - n_answer) + [1.0] * n_answer
    prompt = fmt.build(fmt.lwm_chat("What happens?", video), CODEC, VOCAB)
    assert prompt.tokens.tolist() == rec.tokens[: len(prompt)].tolist() and prompt.loss_mask.sum() == 0


def test_video_first_questions_share_the_cached_prefix():
    video = fmt.Video(np.arange(8).reshape(2, 4))
    prefix = fmt.build(fmt.video_first_prefix(video), CODEC, VOCAB)
    assert prefix.tokens[prefix.vision_mask][-1] == VOCAB.eov
    for question in ["Who?", "What colour is the car?"]:
        rec = fmt.build(fmt.video_first_chat(question, video, answer="x"), CODEC, VOCAB)
        np.testing.assert_array_equal(rec.tokens[: len(prefix)], prefix.tokens)
        np.testing.assert_array_equal(rec.vision_mask[: len(prefix)], prefix.vision_mask)
        assert fmt.parse(rec, CODEC, VOCAB).segments[-2].text.startswith(f"\n{question} ASSISTANT:")
        assert (
            _render(rec)
            == f"You are a helpful assistant. USER: <vision>{'#' * 10}</vision>\n{question} ASSISTANT: x"
        )
        assert rec.tokens[-1] == CODEC.eos_id and rec.loss_mask.tolist() == [0.0] * (len(rec) - 3) + [1.0] * 3
        prompt = fmt.build(fmt.video_first_chat(question, video), CODEC, VOCAB)
        assert prompt.tokens.tolist() == rec.tokens[: len(prompt)].tolist() and prompt.loss_mask.sum() == 0
        assert prompt.tokens[-1] != CODEC.eos_id


def test_later_turns_follow_the_first_in_either_template():
    codes = np.array([[1, 2]])  # one frame: "###" is its 2 codes and <eov>
    for template, first in (
        ("video_first", "You are a helpful assistant. USER: <vision>###</vision>\nQ1? ASSISTANT: A1."),
        ("lwm", "You are a helpful assistant. USER: Q1?\n<vision>###</vision> ASSISTANT: A1."),
    ):
        doc = fmt.conversation(fmt.Video(codes, 0.5), [("Q1?", "A1."), ("Q2?", "A2.")], template=template)
        rec = fmt.build(doc, CODEC, VOCAB)
        assert _render(rec) == first + " USER: Q2? ASSISTANT: A2."
        # by hand: BOS, the first turn, then the later turn's prompt (weight 0) and answer (weight 1), EOS
        prompt, answer = CODEC.encode(" USER: Q2? ASSISTANT:"), CODEC.encode(" A2.")
        head = fmt.build(fmt.chat("Q1?", fmt.Video(codes, 0.5), "A1.", template=template), CODEC, VOCAB)
        expected = [*head.tokens[:-1], *prompt, *answer, CODEC.eos_id]
        assert rec.tokens.tolist() == expected
        weights = [*head.loss_mask[:-1], *[0.0] * len(prompt), *[1.0] * len(answer), 1.0]
        assert rec.loss_mask.tolist() == weights
        assert set(rec.loss_mask[rec.vision_mask].tolist()) == {0.5}  # the video keeps its weight
    assert fmt.later_turn("Q?", "A.", 0.5) == (fmt.Text(" USER: Q? ASSISTANT:"), fmt.Text(" A.", 0.5))
    with pytest.raises(ValueError, match="at least one"):
        fmt.conversation(fmt.Video(codes), [])


def test_question_only_and_text_prompts_put_nothing_or_text_where_the_video_goes():
    rec = fmt.build(fmt.question_only_prompt("Who?"), CODEC, VOCAB)
    assert rec.tokens.tolist() == [1, *CODEC.encode("You are a helpful assistant. USER: \nWho? ASSISTANT:")]
    assert not rec.vision_mask.any() and rec.loss_mask.sum() == 0
    lwm = fmt.build(fmt.question_only_prompt("Who?", template="lwm"), CODEC, VOCAB)
    assert lwm.tokens.tolist() == [1, *CODEC.encode("You are a helpful assistant. USER: Who?\n ASSISTANT:")]
    text = fmt.text_chat("hay needle hay", "Where?", system="S.")
    assert text == "S. USER: hay needle hay\nWhere? ASSISTANT:"
    assert fmt.template_words() == "You are a helpful assistant. USER: ASSISTANT:"


def test_tokens_per_frame_and_the_prefix_overhead_by_hand():
    assert fmt.tokens_per_frame((2, 2)) == 5 and fmt.tokens_per_frame((16, 16)) == 257
    rec = fmt.build(fmt.Document((fmt.Video(np.zeros((3, 2, 2), np.int32)),)), CODEC, VOCAB)
    assert rec.vision_mask.sum() == 3 * fmt.tokens_per_frame((2, 2))
    # one character one token: BOS, "You are a helpful assistant. USER: " (35), "<vision>" (8), "</vision>" (9)
    assert fmt.prefix_overhead(CODEC) == 1 + 35 + 8 + 9
    assert fmt.prefix_overhead(CODEC, system="S.") == 1 + len("S. USER: ") + 8 + 9
    # 53 + 10 frames of 5 + 7 reserved = 110: exactly 10 frames fit 110 tokens, 9 fit 109, none fit 50
    assert fmt.frames_that_fit(110, 7, (2, 2), CODEC) == 10
    assert fmt.frames_that_fit(109, 7, (2, 2), CODEC) == 9
    assert fmt.frames_that_fit(50, 7, (2, 2), CODEC) == 0


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """The demo's SentencePiece model (400 pieces): the system prompt takes many tokens, some words merge."""
    from lvm.demo import corpus
    from lvm.tokenizers import text

    root = tmp_path_factory.mktemp("sp")
    return text.train(corpus.tokenizer_text(root / "text.txt", lights_out=False), 400, root / "sp")


@pytest.mark.parametrize("question", ["What colour was the shape that appeared?", "Which shape?", "x"])
def test_prefix_overhead_is_what_a_real_prompt_spends_beside_video_and_question(sp, question):
    for frames, shape in ((1, (4, 4)), (5, (2, 3))):
        video = fmt.Video(np.zeros((frames, *shape), np.int32))
        full = fmt.build(fmt.video_first_chat(question, video), sp)
        video_tokens = int(full.vision_mask.sum())
        assert video_tokens == frames * fmt.tokens_per_frame(shape)
        after = sp.encode(f"\n{question} ASSISTANT:", continuation=True)  # what follows the video
        assert fmt.prefix_overhead(sp) == len(full) - video_tokens - len(after)
        assert full.tokens[-len(after) :].tolist() == after
    # by hand: BOS, the system prompt and "USER: ", and <vision>, </vision> (single pieces of the tokenizer)
    assert fmt.prefix_overhead(sp) == 1 + len(sp.encode("You are a helpful assistant. USER: ")) + 2
    # the question-only prompt is BOS and the template's text without the video, tokenized as one piece
    rec = fmt.build(fmt.question_only_prompt(question), sp)
    assert rec.tokens.tolist() == [
        sp.bos_id,
        *sp.encode(f"You are a helpful assistant. USER: \n{question} ASSISTANT:"),
    ]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t, v: t.__setitem__(np.flatnonzero(v)[-1], VOCAB.eof), "end with <eov>"),
        (lambda t, v: t.__setitem__(np.flatnonzero(v)[2], VOCAB.eov), "only close the last frame"),
        (lambda t, v: v.__setitem__(np.flatnonzero(v)[0] - 1, True), "not wrapped"),
    ],
)
def test_parse_rejects_malformed_records(mutate, message):
    rec = fmt.build(fmt.Document((fmt.Video(np.ones((2, 3), np.int32)),)), CODEC, VOCAB)
    tokens, vision = rec.tokens.copy(), rec.vision_mask.copy()
    mutate(tokens, vision)
    with pytest.raises(ValueError, match=message):
        fmt.parse(fmt.TokenRecord(tokens, vision, rec.loss_mask), CODEC, VOCAB)


def test_build_rejects_out_of_range_codes_and_empty_videos():
    with pytest.raises(ValueError, match=r"in \[0, 16\)"):
        fmt.build(fmt.Document((fmt.Video(np.array([[16]])),)), CODEC, VOCAB)
    with pytest.raises(ValueError, match="frames >= 1"):
        fmt.Video(np.zeros((0, 4), np.int32))


WEIGHTS = st.sampled_from([0.0, 0.5, 1.0])
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
VIDEO = st.builds(
    lambda frames, hw, seed, loss: fmt.Video(
        np.random.default_rng(seed).integers(0, VOCAB.n_codes, (frames, *hw)).astype(np.int32), loss
    ),
    st.integers(1, 4),
    st.sampled_from([(1, 1), (2, 2), (2, 3)]),
    st.integers(0, 2**16),
    WEIGHTS,
)
DOCUMENT = st.builds(
    fmt.Document,
    st.lists(st.one_of(st.builds(fmt.Text, TEXT, WEIGHTS), VIDEO), max_size=6).map(tuple),
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(DOCUMENT)
def test_build_parse_round_trip(doc):
    rec = fmt.build(doc, CODEC, VOCAB)
    back = fmt.parse(rec, CODEC, VOCAB)
    canon = doc.canonical()
    assert (back.bos, back.eos) == (doc.bos, doc.eos)
    assert len(back.segments) == len(canon.segments)
    for got, want in zip(back.segments, canon.segments, strict=True):
        if isinstance(want, fmt.Video):
            assert isinstance(got, fmt.Video) and got.loss == want.loss
            np.testing.assert_array_equal(got.codes, want.codes.reshape(len(want.codes), -1))
        else:
            assert got == want
    again = fmt.build(back, CODEC, VOCAB)
    for a, b in [
        (rec.tokens, again.tokens),
        (rec.vision_mask, again.vision_mask),
        (rec.loss_mask, again.loss_mask),
    ]:
        np.testing.assert_array_equal(a, b)
    n_frames = sum(len(s.codes) for s in doc.segments if isinstance(s, fmt.Video))
    vision = rec.tokens[rec.vision_mask]
    assert np.sum(vision == VOCAB.eov) + np.sum(vision == VOCAB.eof) == n_frames
