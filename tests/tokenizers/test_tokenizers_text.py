"""SentencePiece wrapper: trained on a real corpus (KJV Genesis), sequence-safe joining, no mid-sequence BOS/EOS."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvm import cli
from lvm.demo.corpus import TEXT_CORPUS
from lvm.tokenizers import format as fmt
from lvm.tokenizers import text

CORPUS = TEXT_CORPUS  # a KJV Genesis excerpt shipped with the demo
LINES = CORPUS.read_text().splitlines()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return text.train(CORPUS, 2000, tmp_path_factory.mktemp("sp") / "kjv")


def test_vision_markers_are_single_pieces(tok):
    for marker in (fmt.VISION_START, fmt.VISION_END):
        assert len(tok.encode(marker, continuation=True)) == 1
        assert tok.piece(tok.encode(marker, continuation=True)[0]) == marker


def test_single_piece_equals_plain_sentencepiece(tok):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok.model_file)
    for line in LINES[:50]:
        assert tok.encode_pieces([line], bos=True, eos=True) == [tok.bos_id, *sp.encode(line), tok.eos_id]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(LINES) - 1), st.lists(st.floats(0, 1), max_size=5), st.booleans(), st.booleans())
def test_pieces_join_without_markers_bos_or_eos_inside(tok, line, cuts, bos, eos):
    s = LINES[line]
    points = sorted({int(c * len(s)) for c in cuts})
    pieces = [s[a:b] for a, b in zip([0, *points], [*points, len(s)], strict=True)]
    ids = tok.encode_pieces(pieces, bos=bos, eos=eos)
    inner = ids[int(bos) : len(ids) - int(eos)]
    assert tok.bos_id not in inner and tok.eos_id not in inner
    assert (ids[0] == tok.bos_id) == bos and (ids[-1] == tok.eos_id) == eos
    assert tok.decode(ids) == s  # the joined text is exactly the concatenation
    for piece in pieces[1:]:  # a later piece starts with '▁' only if it starts with a space
        if piece:
            first = tok.piece(tok.encode(piece, continuation=True)[0])
            assert first.startswith(text.WORD_START) == piece.startswith(" ")


def test_no_word_start_marker_where_pieces_meet(tok):
    ids = tok.encode_pieces(["In the begin", "ning God"], bos=False)
    assert [tok.piece(i) for i in ids] == [tok.piece(i) for i in tok.encode("In the begin")] + [
        tok.piece(i) for i in tok.encode("ning God", continuation=True)
    ]
    assert not tok.piece(tok.encode("ning God", continuation=True)[0]).startswith(text.WORD_START)
    assert tok.decode(ids) == "In the beginning God"


def test_video_first_document_round_trip_with_real_tokenizer(tok):
    doc = fmt.Document((fmt.image(np.arange(4).reshape(2, 2)), fmt.Text("A lamp.", 1.0)), bos=True, eos=True)
    rec = fmt.build(doc, tok)
    assert tok.piece(rec.tokens[1]) == fmt.VISION_START
    assert fmt.parse(rec, tok, frame_shape=(2, 2)) == doc


def test_chat_document_round_trip_with_real_tokenizer(tok):
    codes = np.random.default_rng(0).integers(0, 8192, (3, 16, 16))
    doc = fmt.lwm_chat("Who made the light?", fmt.Video(codes), answer=LINES[2])
    rec = fmt.build(doc, tok)
    assert rec.tokens[0] == tok.bos_id and np.sum(rec.tokens[~rec.vision_mask] == tok.bos_id) == 1
    assert rec.vision_mask.sum() == 3 * 257  # 256 codes + <eof>/<eov> per frame
    back = fmt.parse(rec, tok, frame_shape=(16, 16))
    assert [s.text for s in back.segments if isinstance(s, fmt.Text)] == [
        s.text for s in doc.segments if isinstance(s, fmt.Text)
    ]
    np.testing.assert_array_equal(back.segments[1].codes, codes)


def test_loads_a_unigram_model_and_cli(tmp_path, capsys):
    argv = [
        "--corpus",
        str(CORPUS),
        "--vocab-size",
        "800",
        "--out",
        str(tmp_path / "uni"),
        "--model-type",
        "unigram",
    ]
    assert cli.run_command("train-text-tokenizer", argv) == 0
    assert '"vocab_size": 800' in capsys.readouterr().out
    tok = text.SentencePieceTokenizer(tmp_path / "uni.model")
    assert (
        tok.decode(tok.encode_pieces(["And God", " said, ", "Let there be light"]))
        == "And God said, Let there be light"
    )


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        text.SentencePieceTokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="SentencePiece training failed"):
        text.train(CORPUS, 10_000_000, tmp_path / "huge")
