"""The project installs under the `lvm` namespace and never shadows Hugging Face's `tokenizers`."""

import os
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_hf_tokenizers_and_ours_coexist(tmp_path):
    code = (
        "import tokenizers, lvm.tokenizers, lvm.data_pipeline\n"
        "assert hasattr(tokenizers, 'Tokenizer'), tokenizers.__file__\n"
        "assert 'site-packages' in tokenizers.__file__, tokenizers.__file__\n"
        "print(lvm.tokenizers.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert pathlib.Path(out.stdout.strip()) == ROOT / "tokenizers" / "__init__.py"


def test_python_started_in_the_repository_root_gets_hf_tokenizers():
    """`python -c` in the checkout puts the repository root (with this project's `tokenizers/`) first on sys.path;
    Hugging Face's package must still be the one `import tokenizers` and `transformers` get."""
    code = (
        "import tokenizers\n"
        "assert 'site-packages' in tokenizers.__file__ and hasattr(tokenizers, 'Tokenizer'), tokenizers.__file__\n"
        "from transformers import AutoTokenizer\n"
        "import lvm.tokenizers.format\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_wheel_has_no_top_level_tokenizers(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
            ROOT,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lvm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level <= {"lvm", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top_level
    assert "lvm/tokenizers/__init__.py" in names and "lvm/data_pipeline/__init__.py" in names
    sources = {
        "lvm": ROOT / "lvm",
        "lvm/tokenizers": ROOT / "tokenizers",
        "lvm/data_pipeline": ROOT / "data_pipeline",
    }
    for prefix, folder in sources.items():
        for path in folder.rglob("*.py"):
            assert f"{prefix}/{path.relative_to(folder).as_posix()}" in names, (
                f"{path} is missing from the wheel"
            )


def test_console_script_lists_commands():
    out = subprocess.run(
        [ROOT / ".venv" / "bin" / "lvm", "--help"], capture_output=True, text=True, check=True
    )
    assert "bench" in out.stdout
