"""SentencePiece text tokenizer: load any `.model` (LLaMA's included), encode multi-piece sequences, train one.

Joining rule for `encode_pieces` (and for `encode(..., continuation=True)`): the pieces are encoded one by one and
their ids concatenated. Only the first piece of a sequence gets the model's word-start marker '▁' (its "dummy
prefix"); a later piece is encoded as the direct continuation of the text before it, so no '▁' appears where two
pieces meet unless the text itself has a space there (a space becomes '▁' as usual). The decoded sequence is
therefore exactly the concatenation of the pieces (for models without lossy normalisation, such as the ones
`train` makes and LLaMA's). Subwords never merge across a piece boundary. BOS is added only before the first
piece and EOS only after the last, and only when asked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from lvm.tokenizers.format import VISION_END, VISION_START

WORD_START = "\u2581"  # SentencePiece's word-start marker '▁'


class SentencePieceTokenizer:
    """A SentencePiece model with sequence-safe encoding (see the module docstring for the joining rule)."""

    def __init__(self, model_file: str | os.PathLike):
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"no SentencePiece model at {model_file}")
        self.model_file = str(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        proto = sentencepiece_model_pb2.ModelProto()
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
        self.add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        proto.normalizer_spec.add_dummy_prefix = False
        # The same model without the dummy prefix encodes pieces that continue a sequence.
        self._sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_file} defines no BOS or EOS piece; train it with bos_id and eos_id set")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, continuation: bool = False) -> list[int]:
        """Ids of `text` without BOS/EOS; `continuation=True` when it continues earlier text (no '▁' added)."""
        return list((self._sp_cont if continuation else self._sp).encode(text))

    def encode_pieces(self, pieces: Sequence[str], bos: bool = True, eos: bool = False) -> list[int]:
        """One id sequence from several text pieces: BOS only at the start, EOS only at the end (if asked)."""
        ids = [self.bos_id] if bos else []
        for i, piece in enumerate(pieces):
            ids += self.encode(piece, continuation=i > 0)
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int], continuation: bool = False) -> str:
        """Text of `ids` (control ids such as BOS/EOS are skipped); inverts `encode` with the same flag."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if self._sp.is_control(i):
                continue
            if self._sp.is_byte(i):
                out.append(int(self._sp.id_to_piece(i)[3:5], 16))  # "<0xAB>"
            elif self._sp.is_unknown(i):
                out += " \u2047 ".encode()
            else:
                out += self._sp.id_to_piece(i).replace(WORD_START, " ").encode()
        text = out.decode("utf-8", errors="replace")
        if not continuation and self.add_dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def piece(self, i: int) -> str:
        """The vocabulary piece of id `i`."""
        return self._sp.id_to_piece(int(i))


def train(
    corpus: str | os.PathLike,
    vocab_size: int,
    out_prefix: str | os.PathLike,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
) -> SentencePieceTokenizer:
    """Train a LLaMA-style model (BPE, byte fallback, split digits, no normalisation, unk/bos/eos = 0/1/2) with
    `<vision>` and `</vision>` as single user-defined pieces; writes `{out_prefix}.model` and `.vocab`."""
    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"no corpus at {corpus}")
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(out_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            user_defined_symbols=[VISION_START, VISION_END],
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            minloglevel=2,  # warnings and errors only
        )
    except RuntimeError as err:  # e.g. a vocabulary too large for the corpus
        raise ValueError(f"SentencePiece training failed: {err}") from err
    return SentencePieceTokenizer(f"{out_prefix}.model")
