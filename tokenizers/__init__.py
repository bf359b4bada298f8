"""Video (VQGAN) and text (SentencePiece) tokenizers and the interleaved token format. Installed as `lvm.tokenizers`."""
