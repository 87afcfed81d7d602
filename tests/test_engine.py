import inspect
import json
import math
import re

import pytest
import torch

from dfkd.core.checkpoint import safe_load
from dfkd.core.config import load_config
from dfkd.core.optim import build_optimizer, lr_factor
from dfkd.core.runs import read_metrics
from dfkd.core.schema import OptimConfig, SchedConfig
from dfkd.loop.engine import DivergenceError, Engine
from dfkd.methods.losses.base import LOSSES, register
from dfkd.nets.arch import load_model
from dfkd_base.errors import CheckpointError, ConfigError


def teacher_config(tmp_path, *overrides):
    return load_config("teacher/lenet5-digits", [f"output.root={tmp_path}", "train.log_every=5", *overrides])


def state_of(engine):
    return {k: v.clone() for k, v in engine.student.module.state_dict().items()}


@pytest.mark.slow
def test_teacher_training_on_digits_end_to_end(tmp_path):
    engine = Engine(teacher_config(tmp_path, "train.epochs=6"))
    summary = engine.fit()
    run = engine.run_dir
    assert summary["final_acc"] > 94.0, summary          # 450 held-out digits
    assert summary["best_acc"] >= summary["final_acc"]
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {p.name for p in run.iterdir()}
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    assert {"last.pt", "final.pt", "best.pt"} <= {p.name for p in (run / "ckpt").iterdir()}
    assert run.parent.name == "teacher-lenet5-digits" and run.name.endswith("_s0")

    model, meta = load_model(run / "ckpt" / "final.pt")
    assert meta["dataset"] == "digits" and meta["arch"]["name"] == "lenet5"
    assert meta["accuracy"] == pytest.approx(summary["final_acc"])
    assert meta["config"]["experiment"] == "teacher-lenet5-digits" and len(meta["sha256"]) == 64

    metrics = read_metrics(run)
    evals = [m for m in metrics if "eval/acc" in m]
    assert [m["step"] for m in evals] == [21 * e for e in range(1, 7)]  # global step = iteration, 21 per epoch
    assert any("loss/model/ce" in m for m in metrics)
    losses_logged = [m["loss/model/ce"] for m in metrics if "loss/model/ce" in m]
    assert losses_logged[-1] < losses_logged[0] / 3


@pytest.mark.slow
@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, fit_until_killed, ema):
    cfg = ["train.epochs=3", "train.iters_per_epoch=4", "runtime.deterministic=true",
           *([f"players.model.ema={ema}"] if ema else [])]
    full = Engine(teacher_config(tmp_path / "a", *cfg), write=False)
    full.fit()
    expected = state_of(full)

    # the same run killed right after its epoch-2 checkpoint
    killed = Engine(teacher_config(tmp_path / "b", *cfg))
    fit_until_killed(killed, epoch=2)
    last = killed.run_dir / "ckpt" / "last.pt"
    assert safe_load(last)["step"] == 8

    resumed = Engine(teacher_config(tmp_path / "b", *cfg), resume=last)
    assert resumed.run_dir == killed.run_dir and resumed.step == 8
    resumed.fit()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed.student.module.state_dict()[name]), name
    if ema:
        for name, tensor in full.student.ema.state_dict().items():
            assert torch.equal(tensor, resumed.student.ema.state_dict()[name]), name
    assert resumed.players["model"].optimizer.state_dict()["state"].keys() == \
        full.players["model"].optimizer.state_dict()["state"].keys()
    steps = [m["step"] for m in read_metrics(resumed.run_dir) if "eval/acc" in m]
    assert steps == [4, 8, 12]  # the resumed run appends; nothing logged twice


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    engine = Engine(teacher_config(tmp_path, "train.epochs=1", "train.iters_per_epoch=2"))
    engine.fit()
    with pytest.raises(CheckpointError, match=r"from another config; differs in players\.model\.optim\.lr"):
        Engine(teacher_config(tmp_path, "train.epochs=1", "train.iters_per_epoch=2", "optim.lr=0.3".replace(
            "optim", "players.model.optim")), resume=engine.run_dir / "ckpt" / "last.pt")
    with pytest.raises(CheckpointError, match="not a training state"):
        Engine(teacher_config(tmp_path, "train.epochs=1", "train.iters_per_epoch=2"),
               resume=engine.run_dir / "ckpt" / "final.pt")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    @register("test_nan_after_3")
    def nan_after(ctx):
        nan_after.calls = getattr(nan_after, "calls", 0) + 1
        value = ctx.student_logits.mean() * 0
        return value + (float("nan") if nan_after.calls > 3 else 0.0)

    try:
        engine = Engine(teacher_config(tmp_path, "train.epochs=2", "train.iters_per_epoch=2",
                                       "phases.0.losses={ce: 1.0, test_nan_after_3: 1.0}"))
        with pytest.raises(DivergenceError) as err:
            engine.fit()
        msg = str(err.value)
        assert "iteration 3" in msg and "test_nan_after_3 is nan" in msg and "last.pt" in msg
        assert safe_load(engine.run_dir / "ckpt" / "last.pt")["step"] == 2  # the epoch-1 state is intact
    finally:
        LOSSES._items.pop("test_nan_after_3")


def test_flush_finite_check_reads_flags_at_log_time_and_names_the_term(tmp_path):
    @register("test_nan_after_5")
    def nan_after(ctx):
        nan_after.calls = getattr(nan_after, "calls", 0) + 1
        return ctx.student_logits.mean() * 0 + (float("nan") if nan_after.calls > 5 else 0.0)

    try:  # iterations 0-7, epochs of 4: the NaN from iteration 5 on is read at iteration 7, before it is saved
        engine = Engine(teacher_config(tmp_path, "train.epochs=2", "train.iters_per_epoch=4", "train.log_every=4",
                                       "runtime.finite_check=flush",
                                       "phases.0.losses={ce: 1.0, test_nan_after_5: 1.0}"))
        assert engine.runtime.finite_check == "flush"
        with pytest.raises(DivergenceError) as err:
            engine.fit()
        msg = str(err.value)
        assert msg.startswith("iteration 7, phase 'model': loss test_nan_after_5 was not finite at an iteration "
                              "from 4 on"), msg
        assert safe_load(engine.run_dir / "ckpt" / "last.pt")["step"] == 4
        assert all(math.isfinite(v) for row in read_metrics(engine.run_dir) for v in row.values()
                   if isinstance(v, float))
    finally:
        LOSSES._items.pop("test_nan_after_5")


def test_learning_rate_schedules():
    cos = SchedConfig(name="cosine", warmup_steps=10)
    assert lr_factor(cos, 0, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(cos, 9, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(cos, 60, 110, 0.1) == pytest.approx(0.5)
    assert lr_factor(cos, 110, 110, 0.1) == pytest.approx(0.0)
    step = SchedConfig(name="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(step, s, 100, 0.1) for s in (0, 50, 80)] == pytest.approx([1.0, 0.1, 0.01])


@pytest.mark.parametrize("cfg", [OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
                                 OptimConfig(name="adam", lr=0.01, betas=[0.5, 0.999], weight_decay=1e-4),
                                 OptimConfig(name="adamw", lr=0.01, weight_decay=0.05)])
def test_optimizers_update_all_tensors_at_once_with_the_per_tensor_loops_values(cfg):
    torch.manual_seed(0)
    start = [torch.randn(64, 32, 3, 3), torch.randn(64), torch.randn(10, 256)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(5)]
    finals = {}
    for foreach in (True, False):
        params = [t.clone().requires_grad_() for t in start]
        optimizer = build_optimizer(params, cfg)
        if not foreach:  # the loop torch runs on CPU by default
            accepted = inspect.signature(type(optimizer)).parameters
            settings = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "foreach"}
            optimizer = type(optimizer)(params, **settings, foreach=False)
        assert optimizer.defaults["foreach"] is foreach
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        finals[foreach] = params
    assert all(torch.equal(a, b) for a, b in zip(finals[True], finals[False]))


def test_an_epoch_interval_holds_the_rate_through_each_epoch_as_torchs_scheduler_stepped_per_epoch():
    from dfkd.core.schema import PlayerConfig
    from dfkd.loop.players import Player

    cfg = PlayerConfig(optim=OptimConfig(lr=0.1, momentum=0.9),
                       sched=SchedConfig(name="cosine", min_lr=2e-4, interval="epoch"))
    player = Player("student", cfg, torch.nn.Linear(2, 2), total_steps=40, steps_per_epoch=10)
    reference = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=4, eta_min=2e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in range(4):
        for _ in range(10):
            assert player.lr == pytest.approx(reference.param_groups[0]["lr"]), epoch
            player.step(scaler)
        reference.step()
        cosine.step()
    per_step = Player("student", PlayerConfig(optim=cfg.optim, sched=SchedConfig(name="cosine", min_lr=2e-4)),
                      torch.nn.Linear(2, 2), total_steps=40, steps_per_epoch=10)
    per_step.step(scaler)
    assert per_step.lr < 0.1 and player.lr != per_step.lr  # the default changes the rate every step


def test_summary_is_written(tmp_path):
    engine = Engine(teacher_config(tmp_path, "train.epochs=1", "train.iters_per_epoch=3"))
    engine.fit()
    summary = json.loads((engine.run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_acc"] is not None and summary["time_total_s"] > 0
    assert summary["teacher_acc"] is None and summary["time_to_99pct_teacher_s"] is None  # no teacher here


def test_nan_rollback_returns_to_the_last_checkpoint_and_finishes(tmp_path):
    @register("test_nan_once")
    def nan_once(ctx):
        nan_once.calls = getattr(nan_once, "calls", 0) + 1
        return ctx.student_logits.mean() * 0 + (float("nan") if nan_once.calls == 3 else 0.0)

    try:
        engine = Engine(teacher_config(tmp_path, "train.epochs=2", "train.iters_per_epoch=2", "train.on_nan=rollback",
                                       "phases.0.losses={ce: 1.0, test_nan_once: 1.0}"))
        summary = engine.fit()
        assert summary["steps"] == 4 and engine.rollbacks == 1
        assert any(m.get("nan/rollbacks") == 1 for m in read_metrics(engine.run_dir))
    finally:
        LOSSES._items.pop("test_nan_once")


@pytest.mark.slow
def test_bf16_autocast_trains(tmp_path):
    # CUDA runs use bf16 autocast by default; the same code path runs on CPU when asked for
    engine = Engine(teacher_config(tmp_path, "train.epochs=1", "train.iters_per_epoch=4", "runtime.amp=bf16",
                                   "train.log_every=1"))
    assert engine.amp_dtype == torch.bfloat16
    x = torch.randn(2, 1, 32, 32)
    assert engine.forward(engine.student.module, x).dtype == torch.bfloat16
    engine.fit()
    losses_logged = [m["loss/model/ce"] for m in read_metrics(engine.run_dir) if "loss/model/ce" in m]
    assert len(losses_logged) == 4 and all(0 < v < 10 for v in losses_logged)
    assert all(p.dtype == torch.float32 for p in engine.student.module.parameters())  # master weights stay fp32


def test_two_phases_of_one_player_are_logged_apart(tmp_path):
    engine = Engine(teacher_config(tmp_path, "train.epochs=1", "train.iters_per_epoch=2", "train.log_every=1",
                                   "phases=[{player: model, losses: {ce: 1.0}}, {player: model, losses: {ce: 0.5}}]"))
    assert [p.name for p in engine.phases] == ["model", "model.2"]
    engine.fit()
    logged = {k for m in read_metrics(engine.run_dir) for k in m}
    assert {"loss/model/ce", "loss/model.2/ce"} <= logged
    assert engine.players["model"].steps == 4  # both phases step the same optimizer


def test_weight_average_follows_its_formula_and_is_what_is_evaluated_and_exported(tmp_path):
    engine = Engine(teacher_config(tmp_path, "train.epochs=2", "train.iters_per_epoch=3", "players.model.ema=0.5"))
    player = engine.student
    before = {k: v.clone() for k, v in player.module.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in player.ema.state_dict().items())
    # one step by hand: at step 0 the decay is min(0.5, 1/10) = 0.1
    images, labels = next(iter(engine.test_loader))
    player.optimizer.zero_grad()
    torch.nn.functional.cross_entropy(player.module(images), labels).backward()
    player.step(engine.scaler)
    after = player.module.state_dict()
    for name, avg in player.ema.state_dict().items():
        if avg.is_floating_point():
            torch.testing.assert_close(avg, 0.1 * before[name] + 0.9 * after[name], msg=name)
        else:  # BN's batch counter is copied
            assert torch.equal(avg, after[name]), name
    assert not player.ema.training and not any(p.requires_grad for p in player.ema.parameters())

    summary = engine.fit()
    assert summary["final_acc"] == pytest.approx(engine.evaluate(player.ema)["acc"])
    assert summary["final_acc_live"] == pytest.approx(engine.evaluate(player.module)["acc"])
    exported, _ = load_model(engine.run_dir / "ckpt" / "final.pt")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, player.ema.state_dict()[name]), name
    assert any("eval/acc_live" in m for m in read_metrics(engine.run_dir))


@pytest.mark.parametrize("override, message", [
    ("players.model.ema=1.0", "players.model.ema must be a decay in (0, 1) on a model or generator player, "
                              "got 1.0 on a model"),
    ("players.disc.ema=0.9", "players.disc.ema must be a decay in (0, 1) on a model or generator player, "
                             "got 0.9 on a discriminator"),
    ("phases.1.batch=fresh+ema", "phases.1.batch 'fresh+ema' needs players.generator.ema"),
])
def test_weight_average_rejects_bad_settings(override, message):
    config = {"model": "teacher/lenet5-digits", "disc": "datafree/dfad+advkd-logit-digits"}.get(
        override.split(".")[1], "datafree/dfq-digits")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(config, [override])
