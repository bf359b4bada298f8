"""The trainer in-process: optimizer, gradient accumulation, validation buckets, non-finite losses, checkpoints
restored onto another mesh, one compile, run records, export, and config errors before any compile."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from conftest import make_mesh
from test_model import make_batch

from lvm import checkpoint
from lvm.batch import batch_shardings
from lvm.checkpoint import load_params
from lvm.config import ConfigError, config_from_dict, load_config
from lvm.curriculum import load_curriculum
from lvm.metrics import flops_per_token
from lvm.model import (
    bucket_sums,
    forward,
    init_opt_state,
    init_params,
    loss_fn,
    make_train_step,
    param_shapes,
)
from lvm.optim import decay_mask, learning_rate, make_optimizer
from lvm.trainer import NonFiniteLossError, Trainer, train

SMALL = ["train.seq_len=256", "train.batch_size=8", "data.synthetic_doc_len=257", "data.synthetic_docs=64"]


def stage_cfg(*overrides, stage="1k"):
    return load_curriculum("tiny", [*SMALL, *overrides]).stage(stage).cfg


def test_schedule_warmup_then_cosine_and_decay_mask_skips_norms():
    t = load_config(
        [],
        [
            "train.lr=1.0",
            "train.end_lr=0.1",
            "train.warmup_steps=10",
            "train.steps=110",
            "train.schedule=cosine",
        ],
    ).train
    lr = learning_rate(t)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    for s in (10, 35, 60, 110):  # cosine from lr to end_lr over the 100 steps after warmup
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100))
        assert float(lr(s)) == pytest.approx(expected, rel=1e-5)
    const = learning_rate(load_config([], ["train.lr=2.0", "train.warmup_steps=4"]).train)
    assert float(const(2)) == pytest.approx(1.0) and float(const(500)) == pytest.approx(2.0)

    shapes = param_shapes(load_config(["model/tiny"]).model)
    mask = decay_mask(shapes)
    assert not mask["final_norm"] and not mask["layers"]["attn_norm"] and not mask["layers"]["mlp_norm"]
    assert mask["wte"] and mask["layers"]["wq"] and mask["layers"]["w_down"] and mask["lm_head"]
    assert all(jax.tree.leaves(decay_mask(shapes, decay_norms=True)))


def test_weight_decay_leaves_norms_alone():
    cfg = load_config(["model/tiny"], ["mesh=1,8,1,1", "train.weight_decay=0.5", "train.lr=0.1"])
    opt = make_optimizer(cfg.train)
    params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), param_shapes(cfg.model))
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    # zero gradient: a decayed parameter moves by -lr * wd * p (after warmup-free schedule), a norm not at all
    assert np.allclose(updates["layers"]["wq"], -0.1 * 0.5 * 2.0)
    assert np.all(updates["final_norm"] == 0) and np.all(updates["layers"]["attn_norm"] == 0)


def test_gradient_accumulation_equals_one_big_batch():
    base = ["model/tiny"]
    sets = ["mesh=1,2,1,4", "train.seq_len=128", "train.clip_norm=0", "train.lr=1e-2"]
    full = load_config(base, [*sets, "train.batch_size=4"])
    accum = load_config(base, [*sets, "train.batch_size=4", "train.grad_accum=2"])
    mesh = make_mesh((1, 2, 1, 4))
    batch = make_batch(0, batch=4, seq=128, vision=False)
    batch = batch._replace(loss_mask=jnp.ones_like(batch.loss_mask))  # equal targets in each microbatch
    batch = jax.device_put(batch, batch_shardings(mesh))
    results = []
    for cfg in (full, accum):
        opt = optax.sgd(1.0)
        params = init_params(cfg, mesh, jax.random.key(1))
        step = make_train_step(cfg, mesh, opt)
        new, _, metrics = step(params, init_opt_state(cfg, mesh, opt, params), batch)
        results.append((jax.device_get(new), jax.device_get(metrics)))
    (p1, m1), (p2, m2) = results
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_validation_buckets_match_a_dense_reference():
    cfg = load_config(["model/tiny"], ["mesh=1,2,1,4", "attention.q_chunk=16", "attention.kv_chunk=16"])
    mesh = make_mesh((1, 2, 1, 4))
    batch = jax.device_put(make_batch(5, seq=128), batch_shardings(mesh))
    params = init_params(cfg, mesh, jax.random.key(2))
    sums = np.asarray(bucket_sums(params, batch, cfg, mesh, 4))
    text, vision = (np.asarray(x, np.float64) for x in forward(params, batch, cfg, mesh))
    b = jax.device_get(batch)
    vis = np.asarray(b.target_vision_mask, bool)
    logits = np.where(
        vis[..., None],
        np.pad(vision, [(0, 0), (0, 0), (0, max(0, 512 - vision.shape[-1]))]),
        np.pad(text, [(0, 0), (0, 0), (0, max(0, vision.shape[-1] - 512))]),
    )
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, np.asarray(b.targets)[..., None], -1)[..., 0]
    w = np.asarray(b.loss_mask)
    bucket = np.minimum(np.asarray(b.positions) // 32, 3)
    for k in range(4):
        sel = bucket == k
        np.testing.assert_allclose(sums[k, 0], (ce * w * sel * ~vis).sum(), rtol=1e-4)
        np.testing.assert_allclose(sums[k, 1], (w * sel * ~vis).sum(), rtol=1e-6)
        np.testing.assert_allclose(sums[k, 2], (ce * w * sel * vis).sum(), rtol=1e-4)
        np.testing.assert_allclose(sums[k, 3], (w * sel * vis).sum(), rtol=1e-6)
    loss, _ = loss_fn(params, batch, cfg, mesh)
    expected = 0.5 * (sums[:, 0].sum() / sums[:, 1].sum() + sums[:, 2].sum() / sums[:, 3].sum())
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_run_records_resumes_and_compiles_the_step_once(tmp_path):
    # bf16 compute over float32 master weights, a profiler trace of step 2, MFU against a stated peak
    cfg = stage_cfg(
        "train.steps=3",
        "train.checkpoint_every=3",
        "train.eval_batches=1",
        "model.dtype=bfloat16",
        "train.profile_steps=1,2",
        "train.peak_flops=1e12",
    )
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        result = trainer.run()
        assert result.steps == 3 and result.checkpoint_step == 3 and not result.preempted
        assert trainer.start() == 3  # restore from the checkpoint just written
        trainer.params, trainer.opt_state, _ = trainer.train_step(
            trainer.params, trainer.opt_state, next(trainer.loader)
        )
        assert trainer.train_step._cache_size() == 1
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.params))
    finally:
        trainer.close()
    assert any(p.is_file() for p in (tmp_path / "profile").rglob("*")), "no profiler trace"
    run = json.loads((tmp_path / "run.json").read_text())
    assert len(run["starts"]) == 2 and run["starts"][1]["step"] == 3
    assert run["starts"][0]["commit"] and "jax" in run["starts"][0]["packages"]
    saved = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert saved.train == cfg.train and saved.model == cfg.model and str(saved.mesh) == "1,8,1,1"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "text_loss", "vision_loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
        assert key in records[0]
    r = records[-1]
    assert math.isfinite(r["loss"]) and r["tokens_per_s"] == pytest.approx(8 * 256 / r["step_s"])
    assert r["mfu"] == pytest.approx(flops_per_token(cfg) * 8 * 256 / r["step_s"] / (1e12 * 8))
    assert list((tmp_path / "tb").iterdir()), "no TensorBoard events"
    val = json.loads((tmp_path / "summary.json").read_text())["val"]
    assert len(val["buckets"]) == 4 and all(b["loss"] > 0 for b in val["buckets"])


@pytest.mark.slow
def test_restore_onto_another_mesh_gives_the_same_loss(tmp_path):
    cfg = stage_cfg("train.steps=2", "train.checkpoint_every=2")
    train(cfg, tmp_path, progress=False)
    batch = make_batch(7, batch=8, seq=256, vision=False)
    losses = []
    for shape in ((1, 8, 1, 1), (1, 2, 1, 4), (2, 1, 2, 2)):
        mesh = make_mesh(shape)
        other = stage_cfg(f"mesh={','.join(map(str, shape))}")
        params = load_params(tmp_path, other, mesh)
        assert params["layers"]["wq"].sharding.mesh.shape == mesh.shape
        losses.append(float(loss_fn(params, jax.device_put(batch, batch_shardings(mesh)), other, mesh)[0]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_time_based_checkpoints_follow_the_clock_and_process_0_decides(tmp_path, monkeypatch, capfd):
    # a fake clock: 50 s per step; checkpoint_minutes=2 saves when 120 s passed since the last save
    cfg = stage_cfg(
        "train.steps=8",
        "train.checkpoint_every=5",
        "train.checkpoint_minutes=2",
        "train.keep_checkpoints=10",
    )
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.clock = lambda: 50.0 * trainer.step
    # the write of checkpoint 5 fails once (as a storage outage beyond the clients' retries would): saved again
    import lvm.trainer

    monkeypatch.setattr(lvm.trainer, "SAVE_RETRY_S", 0.0)
    save, failed = trainer.checkpoints.save, []

    def flaky_save(step, *args):
        if step == 5 and not failed:
            failed.append(step)
            raise OSError("injected: the bucket is unreachable")
        save(step, *args)

    monkeypatch.setattr(trainer.checkpoints, "save", flaky_save)
    try:
        trainer.run()
        # 150 s at step 3; step 5 by count (resets the timer); 150 s again at step 8 (the end saves anyway)
        assert trainer.checkpoints.all_steps() == [3, 5, 8]
    finally:
        trainer.close()
    assert failed == [5] and "writing a checkpoint failed (OSError: injected" in capfd.readouterr().err

    # with several processes, process 0's decision is broadcast: this one's clock does not count
    from jax.experimental import multihost_utils

    import lvm.trainer

    sent = []

    def broadcast(x):
        sent.append(bool(x))
        return np.array(False)  # process 0 says: not yet

    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert lvm.trainer._agreed(True) is False and sent == [True]
    with pytest.raises(ConfigError, match="checkpoint_minutes=-1.0 must be a number of minutes >= 0"):
        stage_cfg("train.checkpoint_minutes=-1")


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_or_skips_and_keeps_the_last_good_checkpoint(tmp_path, policy):
    # an absurd learning rate blows the parameters up after the first update: step 2's loss is not finite
    cfg = stage_cfg(
        "train.steps=3",
        "train.checkpoint_every=1",
        "train.lr=1e30",
        "train.warmup_steps=0",
        "train.schedule=constant",
        "train.keep_checkpoints=5",
        f"train.nonfinite={policy}",
    )
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="step 2.*not finite.*checkpoint \\(step 1\\) is intact"):
            train(cfg, tmp_path, progress=False)
        ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
        assert ckpt.all_steps() == [1]
        ckpt.close()
        return
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        result = trainer.run()
        restored = trainer.checkpoints.restore(1, *trainer._abstract())[0]
        assert result.steps == 3
        for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(restored), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # skipped updates changed nothing
    finally:
        trainer.close()


def test_export_writes_params_that_load_for_inference(tmp_path):
    from lvm.cli import run_command

    cfg = stage_cfg("train.steps=1", "train.checkpoint_every=1")
    train(cfg, tmp_path / "run", progress=False)
    run_command("export", ["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert not (tmp_path / "export" / "opt_state").exists()
    mesh = make_mesh((1, 8, 1, 1))
    a = load_params(tmp_path / "run", cfg, mesh)
    b = load_params(tmp_path / "export", cfg, mesh)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ConfigError, match="other shapes"):
        load_params(tmp_path / "export", stage_cfg("model.n_layers=3"), mesh)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.seq_len=1020", "data.synthetic_doc_len=1021", "mesh=1,2,1,4"],
            "must be divisible by 8 for the zigzag layout",
        ),
        (["mesh=1,1,8,1"], "n_heads=4 is not divisible by mesh tp=8"),
        (["train.batch_size=4"], "batch size 4 is not divisible by dp\\*fsdp=8"),
        (["mesh=1,2,1,2"], "uses 4 devices but 8 are available"),
        (["train.batch_size=8", "train.grad_accum=3"], "not divisible by train.grad_accum"),
        (["data.synthetic=null"], "no training data"),
    ],
)
def test_impossible_configs_fail_before_compiling(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(stage_cfg(*overrides), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_model_flops_count_every_matmul_parameter_and_causal_attention():
    cfg = load_curriculum("lwm_text").stage("32k").cfg
    m = cfg.model
    shapes = param_shapes(m)
    flat = jax.tree_util.tree_leaves_with_path(shapes)
    # embedding lookups are gathers and norms are elementwise: neither is a matmul
    matmul = sum(x.size for path, x in flat if not any(k in str(path) for k in ("wte", "vte", "norm")))
    attention = 12 * m.n_layers * m.d_model * cfg.train.seq_len / 2
    assert flops_per_token(cfg) == pytest.approx(6 * matmul + attention, rel=1e-9)
    assert 6.5e9 < matmul < 7.0e9  # LLaMA-2-7B's ~6.7B matmul parameters (+ the 8448-entry vision head)
