"""The config schema: YAML + overrides load typed values; bad values fail at load time naming the fix."""

import dataclasses

import pytest
from conftest import make_mesh
from jax.sharding import PartitionSpec as P

from lvm.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    MeshConfig,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)
from lvm.curriculum import load_curriculum, resolve_config
from lvm.model import param_count
from lvm.sharding import logical_spec
from lvm.sharding import make_mesh as mesh_from_config


def test_yaml_and_overrides_load_typed_values(tmp_path):
    extra = tmp_path / "stage.yaml"
    extra.write_text("mesh: 1,-1,2,2\nattention:\n  layout: contiguous\n")
    cfg = load_config(
        ["model/tiny", extra],
        [
            "model.rope_theta=1e6",  # YAML reads "1e6" as a string: coerced to float
            "model.n_layers=3",
            "model.scan_layers=false",
            "model.ffn_chunk=64",
            "attention.q_chunk=none",
            "mesh.sp=4",
        ],
    )
    m = cfg.model
    assert (m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.text_vocab_size) == (64, 4, 2, 16, 512)
    assert m.rope_theta == 1e6 and isinstance(m.rope_theta, float)
    assert m.n_layers == 3 and m.scan_layers is False and m.ffn_chunk == 64
    assert cfg.attention == dataclasses.replace(cfg.attention, layout="contiguous", q_chunk=None)
    assert cfg.mesh == MeshConfig(1, -1, 2, 4)
    assert config_from_dict(config_to_dict(cfg)) == cfg  # round trip (what a checkpoint would store)


def test_model_size_configs():
    lwm = load_config(["model/lwm_7b"]).model
    assert (lwm.d_model, lwm.mlp_dim, lwm.n_layers, lwm.n_heads, lwm.n_kv_heads) == (4096, 11008, 32, 32, 32)
    assert (lwm.text_vocab_size, lwm.vision_vocab_size, lwm.rope_layout, lwm.norm_eps) == (
        32000,
        8448,
        "interleaved",
        1e-6,
    )
    # LLaMA-2 7B (6.74B) plus the vision embedding and head (2 * 8448 * 4096)
    assert param_count(lwm) == 6_738_415_616 + 2 * 8448 * 4096
    assert 0.9e9 < param_count(load_config(["model/1b"]).model) < 1.1e9
    assert {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")} >= {"tiny", "1b", "lwm_7b"}


def test_mesh_string_and_minus_one():
    mesh = MeshConfig.parse("1,-1,4,2")
    assert mesh.resolve(16) == MeshConfig(1, 2, 4, 2)
    assert mesh.resolve(8) == MeshConfig(1, 1, 4, 2)
    assert str(mesh) == "1,-1,4,2"
    with pytest.raises(ConfigError, match="not divisible by the fixed axes"):
        mesh.resolve(12)
    with pytest.raises(ConfigError, match="uses 16 devices but 8 are available"):
        MeshConfig.parse("2,2,2,2").resolve(8)
    with pytest.raises(ConfigError, match="more than one -1"):
        MeshConfig.parse("-1,-1,1,1")
    with pytest.raises(ConfigError, match="four integers"):
        MeshConfig.parse("1,2,3")
    built = mesh_from_config(MeshConfig.parse("1,-1,1,4"))
    assert dict(built.shape) == {"dp": 1, "fsdp": 2, "tp": 1, "sp": 4}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_kv_heads=3"], "choose n_kv_heads dividing n_heads"),
        (["model.rope_layout=rotated"], "choose one of \\('interleaved', 'half'\\)"),
        (["model.dtype=fp8"], "model.dtype='fp8' is not supported"),
        (["model.remat=sometimes"], "model.remat"),
        (["model.n_layers=abc"], "model.n_layers='abc' is not a valid int"),
        (["model.d_modl=3"], "did you mean 'model.d_model'"),
        (["modle.d_model=3"], "did you mean 'model'"),
        (["model.n_layers"], "must look like section.key=value"),
        (["attention.layout=striped"], "attention.layout"),
        (["attention.q_chunk=0"], "attention.q_chunk=0 must be positive"),
        (["mesh=1,1,3,1"], "n_heads=4 is not divisible by mesh tp=3"),
        (["mesh=1,1,1"], "four integers"),
    ],
)
def test_bad_values_fail_at_load_naming_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["model/tiny"], overrides)


def test_a_typo_or_bad_yaml_in_a_users_file_names_the_file(tmp_path):
    (tmp_path / "typo.yaml").write_text("train:\n  stpes: 3\n")
    with pytest.raises(
        ConfigError, match=r"typo\.yaml: unknown config key 'train.stpes'; did you mean 'train.steps'"
    ):
        load_config(["model/tiny", tmp_path / "typo.yaml"])
    (tmp_path / "section.yaml").write_text("trian: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"section\.yaml: unknown config key 'trian'; did you mean 'train'"):
        load_config(["model/tiny", tmp_path / "section.yaml"])
    (tmp_path / "broken.yaml").write_text("train:\n  steps: [3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML"):
        load_config(["model/tiny", tmp_path / "broken.yaml"])
    (tmp_path / "cur.yaml").write_text(
        "include: [model/tiny, " + str(tmp_path / "typo.yaml") + "]\nstages: [{name: a}]\n"
    )
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown config key 'train.stpes'"):
        resolve_config([str(tmp_path / "cur.yaml")], None)


def test_unknown_config_file_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="model/tiny"):
        load_config(["model/tinyy"])


def test_head_dim_derivation_and_its_error():
    assert ModelConfig(d_model=64, n_heads=4, n_kv_heads=4).head_dim == 16
    with pytest.raises(ConfigError, match="set model.head_dim explicitly"):
        ModelConfig(d_model=66, n_heads=4, n_kv_heads=4)


def test_device_and_batch_shape_checks():
    cfg = load_config(["model/tiny"], ["mesh=1,2,1,4"])
    assert cfg.check_devices(8) == MeshConfig(1, 2, 1, 4)
    with pytest.raises(ConfigError, match="uses 8 devices but 4 are available"):
        cfg.check_devices(4)
    cfg.check_batch_shape(2, 256, 8)
    with pytest.raises(ConfigError, match="divisible by 8 for the zigzag layout"):
        cfg.check_batch_shape(2, 100, 8)
    with pytest.raises(ConfigError, match="batch size 3 is not divisible by dp\\*fsdp=2"):
        cfg.check_batch_shape(3, 256, 8)
    with pytest.raises(ConfigError, match="model.ffn_chunk=48 must divide the per-device block of 64"):
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ffn_chunk=48)).check_batch_shape(
            2, 256, 8
        )
    with pytest.raises(ConfigError, match="q_chunk=48 must be a positive divisor"):
        load_config(["model/tiny"], ["mesh=1,2,1,4", "attention.q_chunk=48"]).check_batch_shape(2, 256, 8)
    with pytest.raises(ConfigError, match="d_model=64 is not divisible by fsdp\\*sp=128"):
        Config(ModelConfig(d_model=64, n_heads=4, n_kv_heads=4), mesh=MeshConfig(1, 128, 1, 1)).check_devices(
            128
        )


def test_logical_rules():
    assert logical_spec(("layers", "embed", "heads", "head_dim")) == P(None, ("fsdp", "sp"), "tp", None)
    assert logical_spec(("batch", "seq", "act_embed")) == P(("dp", "fsdp"), "sp", "tp")
    with pytest.raises(KeyError, match="add it to lvm.sharding.RULES"):
        logical_spec(("nonsense",))
    assert make_mesh((1, 2, 1, 4)).shape == mesh_from_config(MeshConfig(1, 2, 1, 4)).shape


def test_train_and_plan_read_config_and_stage_flags_alike(tmp_path):
    import argparse

    from lvm.commands import train as train_command

    stage_cfg = load_curriculum("tiny", ["train.steps=5"]).stage("2k").cfg
    assert resolve_config(["tiny"], "2k", ["train.steps=5"]) == (stage_cfg, "2k")
    args = argparse.Namespace(config=["tiny"], stage="2k", set=["train.steps=5"])
    assert train_command.load(args) == stage_cfg  # `lvm train` resolves the flags with the same function

    plain, stage = resolve_config(["model/tiny", "model/demo"], None, ["train.steps=5"])
    assert stage is None and plain == load_config(["model/tiny", "model/demo"], ["train.steps=5"])

    one_stage = tmp_path / "one.yaml"
    one_stage.write_text("include: [model/tiny]\nstages:\n  - name: only\n    train: {seq_len: 512}\n")
    cfg, stage = resolve_config([str(one_stage)], None)
    assert stage == "only" and cfg.train.seq_len == 512
    with pytest.raises(ConfigError, match="pick one with --stage"):
        resolve_config(["tiny"], None)
    with pytest.raises(ConfigError, match="needs exactly one --config naming a curriculum"):
        resolve_config(["model/tiny"], "2k")
    with pytest.raises(ConfigError, match="needs exactly one --config naming a curriculum"):
        resolve_config(["tiny", "model/tiny"], "2k")


def test_config_imports_no_jax_and_inference_never_imports_the_trainer():
    import subprocess
    import sys

    code = (
        "import sys; import lvm.config, lvm.curriculum, lvm.batch, lvm.attention.chunking\n"
        "assert 'jax' not in sys.modules, 'lvm.config imported jax'\n"
        "import lvm.inference, lvm.checkpoint, lvm.commands.export, lvm.interop.hf, lvm.interop.lwm\n"
        "assert 'lvm.trainer' not in sys.modules, 'inference or a command imported the trainer'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
