"""Video (VQGAN) and text (SentencePiece) tokenizers and the interleaved token format. Installed as `lvm.tokenizers`.

Python started in the repository root (a notebook, `python -c`, `python -m`) finds this folder first when anything
imports Hugging Face's top-level `tokenizers` (as `transformers` does). Imported under that name, this module
hands the import over to the installed Hugging Face package, so the folder never shadows it.
"""

if __name__ == "tokenizers":
    import importlib
    import os
    import sys

    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved_path = list(sys.path)
    del sys.modules["tokenizers"]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _repo]
    try:
        _installed = importlib.import_module("tokenizers")
    except ImportError as err:
        raise ImportError(
            f"`import tokenizers` found {_repo}/tokenizers, this project's tokenizers (import them as "
            "`lvm.tokenizers`); Hugging Face's `tokenizers` package is not installed"
        ) from err
    finally:
        sys.path[:] = _saved_path
    sys.modules["tokenizers"] = _installed
