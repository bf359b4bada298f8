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
