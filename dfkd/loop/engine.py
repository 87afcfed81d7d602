"""The training loop: phases of weighted loss terms, one optimizer step at a time.

An *iteration* runs the config's phases in order; a phase takes ``steps`` optimizer steps of one
*player* (student, generator, discriminator, ...) on a batch from one *source* (real data, a
fresh synthetic batch, the previous phase's batch, or the image pool), with the loss
``Σ weight × term``; a ``synthesizer`` phase optimizes one synthetic batch for ``steps`` inner
steps instead. Teacher training, real-data KD and every data-free method are configs of this
one loop (see ``dfkd/configs``); :mod:`dfkd.loop.build` turns a config into the parts it runs.

The global step that every metric is logged against is the iteration count.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dfkd.core.checkpoint import safe_load
from dfkd.core.io import atomic_write_text
from dfkd.core.runs import MetricLogger, RunLock, is_main_process, rank, world_size
from dfkd.core.schema import SYNTHESIZER, Config
from dfkd.data.batch import Batch
from dfkd.loop.build import build_run
from dfkd.loop.callbacks import Callback
from dfkd.loop.context import Services, StepContext
from dfkd.loop.evaluation import evaluate, held_out_agreement
from dfkd.loop.finite import FiniteCheck
from dfkd.loop.phases import Phase
from dfkd.loop.reporting import Reporter
from dfkd.loop.runtime import broadcast_from_rank0, seed_everything
from dfkd.loop.state import (Progress, claim_run_folder, health_problem, last_good_state, restore, resume_from,
                             run_summary, save_state, save_student, weight_norms)
from dfkd.loop.stopping import stop_reason
from dfkd_base.errors import ConfigError, DivergenceError


class Engine:
    """A run of ``config``: ``fit()`` trains, evaluates, logs and checkpoints it. ``resume``: a
    ``ckpt/last.pt`` to continue from; ``write=False``: no run folder (benchmarks, shadow models);
    ``callbacks``: told of the loop's events (:class:`~dfkd.loop.callbacks.Callback`);
    ``train_split``: an in-memory training split in place of the config's dataset's."""

    def __init__(self, config: Config, run_dir: str | Path | None = None, resume: str | Path | None = None,
                 write: bool = True, callbacks: list[Callback] = (), train_split=None):
        self.config = config
        self.callbacks = list(callbacks)
        self.run = run = build_run(config, train_split=train_split)
        self.runtime, self.info, self.modality, self.student_shape = run.runtime, run.info, run.modality, \
            run.student_shape
        self.teachers, self.phases, self.players, self.synth, self.student = \
            run.teachers, run.phases, run.players, run.synth, run.student
        self.real, self.labeled, self.test_loader = run.real, run.labeled, run.test_loader
        self.iters_per_epoch, self.total_iters = run.iters_per_epoch, run.total_iters
        self.scaler = run.runtime.grad_scaler()
        self.progress = Progress()
        self.last_batch: Batch | None = None  # what a 'same' phase reuses
        self.finite = FiniteCheck(self.runtime.finite_check)

        resume_state = None
        if resume is not None:  # the state is read and restored before anything of the folder is written
            resume_state, run_dir = resume_from(Path(resume), run, self.progress, self.scaler, run_dir)
        else:  # the first epoch's state is checked against the starting weights
            self.progress.good_norms = weight_norms(run)
        self.run_dir, self.lock = claim_run_folder(config, run_dir) if write and is_main_process() \
            else (None, RunLock(None))
        # every rank learns rank 0's run folder (to read ckpt/last.pt on a rollback); only rank 0 writes
        shared = broadcast_from_rank0(str(self.run_dir) if self.run_dir else None)
        self.shared_run_dir = Path(shared) if shared else None
        self.logger = MetricLogger(self.run_dir, config.output.tensorboard,
                                   purge_step=self.step + 1 if resume_state else None)
        self.reporter = Reporter(run, self.logger)
        self.services = Services(self.runtime, self.teachers, self.players, run.model_taps, self.reporter.add,
                                 self.reporter.warn)

    # ---------------------------------------------------------------- views of the parts
    step = property(lambda self: self.progress.step, lambda self, v: setattr(self.progress, "step", v))
    rollbacks = property(lambda self: self.progress.rollbacks)
    device, amp_dtype, channels_last = (property(lambda self, k=k: getattr(self.runtime, k))
                                        for k in ("device", "amp_dtype", "channels_last"))

    terms = property(lambda self: {p.index: p.terms for p in self.phases})

    def forward(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return self.runtime.forward(module, images)

    def evaluate(self, model: nn.Module, loader=None, student: bool = False) -> dict:
        """Accuracy and loss on the test split (a student: on its modality of it)."""
        return evaluate(model, loader or self.test_loader, self.runtime.forward, self.modality, self.info, student,
                        predictions=student)  # a student's classes make the per-class pictures

    def context(self, phase: Phase, batch: Batch) -> StepContext:
        return StepContext(phase, self.run.student_view(batch), self.services, self.step,
                           self.step // self.iters_per_epoch)

    # ---------------------------------------------------------------- batches
    def next_batch(self, phase: Phase) -> Batch:
        """A batch from the phase's source. ``same`` is the batch an earlier phase drew last (a
        synthetic one without the generator's augmentation, and detached); the generator's sources
        (``fresh``, ``fresh+ema``, ``regenerated``) are drawn by the synthesizer."""
        if phase.batch == "same":
            if self.last_batch is None:
                raise ConfigError(f"phase '{phase.name}': a 'same' batch needs an earlier phase that draws one")
            return self.last_batch
        if phase.batch in ("real", "labeled"):
            batch = self.last_batch = (self.real if phase.batch == "real" else self.labeled).next()
        elif phase.batch == "pool":
            batch = self.last_batch = self.synth.replay()
        else:
            generator = self.players[self.config.synthesis.generator]
            batch = self.synth.draw(phase.batch, self.players.module(generator.name), generator,
                                    trains_generator=phase.player == generator.name)
            self.last_batch = self.synth.last
        return batch

    # ---------------------------------------------------------------- one phase
    def phase_loss(self, phase: Phase, batch: Batch) -> torch.Tensor:
        """Σ weight × term on ``batch``, with a NaN guard; records the terms for logging."""
        ctx = self.context(phase, batch)
        epoch = self.step // self.iters_per_epoch
        terms = [t for t in phase.terms if epoch >= t.from_epoch]
        values = {t.name: t(ctx) for t in terms}
        total = sum(t.weight * values[t.name] for t in terms)
        if problem := self.finite.step(phase.name, values, total):
            raise self.diverged(problem)
        self.reporter.add_losses(phase.name, {**{k: v.detach() for k, v in values.items()}, "total": total.detach()})
        return total

    def run_phase(self, phase: Phase) -> None:
        """All of a phase's steps in this iteration."""
        if phase.player == SYNTHESIZER:
            t0 = time.perf_counter()
            with self.players.training({SYNTHESIZER}):
                def inner_step(batch: Batch) -> torch.Tensor:
                    phase.zero_term_grads()
                    return self.phase_loss(phase, batch)

                self.synth.synthesize(inner_step, phase.steps, after_backward=phase.step_terms,
                                      on_keep=phase.keep_step)
            phase.end_batch()
            self.last_batch = self.synth.last
            self.progress.timers["synthesis"] += time.perf_counter() - t0
            return
        player = self.players[phase.player]
        updated = [player] + [self.players[name] for name in phase.also]
        t0 = time.perf_counter()
        for _ in range(phase.steps):
            with self.players.training(phase.trains, phase.config.train_mode):
                phase.zero_term_grads()
                batch = self.next_batch(phase)
                if phase.transform is not None:
                    batch = phase.transform(batch)
                total = self.phase_loss(phase, batch)
                for p in updated:
                    p.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(total).backward()
                for p in updated:
                    grad_norm = p.step(self.scaler)
                    if grad_norm is not None:
                        tag = f"grad_norm/{phase.name}" + ("" if p is player else f"/{p.name}")
                        self.reporter.add(tag, grad_norm.detach().float())
                self.scaler.update()
                phase.step_terms()
                phase.end_batch()
        if player.kind == "generator":  # training the generator is synthesis time
            self.progress.timers["synthesis"] += time.perf_counter() - t0

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        tc = self.config.train
        show = sys.stderr.isatty() and "CI" not in os.environ if self.config.runtime.progress == "auto" \
            else bool(self.config.runtime.progress)
        from tqdm import tqdm

        bar = tqdm(total=self.total_iters, initial=self.step, disable=not (show and is_main_process()),
                   desc=self.config.experiment, dynamic_ncols=True, leave=False)
        if self.teachers.first is not None and self.test_loader is not None and self.progress.teacher_acc is None:
            self.progress.teacher_acc = self.evaluate(self.teachers.evaluation_model())["acc"]
            self.logger.scalars(0, {"eval/teacher_acc": self.progress.teacher_acc})
        self.progress.set_wall(self.progress.wall_before)  # the clock runs from here: building the run is not timed
        try:
            while self.step < self.total_iters and not self.progress.stopped:
                t0 = time.perf_counter()
                warming_up = self.step < self.config.synthesis.warmup_epochs * self.iters_per_epoch
                self.reporter.picked(self.teachers.draw(), len(self.teachers))
                try:
                    epoch = self.step // self.iters_per_epoch
                    for phase in self.phases:
                        if phase.runs_in(epoch) and (not warming_up or phase.player == SYNTHESIZER):
                            self.run_phase(phase)
                    done = self.step + 1  # before what this iteration logs and saves, its losses are checked
                    due = done % tc.log_every == 0 or done % self.iters_per_epoch == 0 or done == self.total_iters
                    if due and (problem := self.finite.read(self.step)):
                        raise self.diverged(problem)
                except DivergenceError as exc:
                    self._roll_back(exc)
                    continue
                self.step += 1
                self.progress.timers["train"] += time.perf_counter() - t0
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == self.total_iters:
                    self._flush()
                if self.step % self.iters_per_epoch == 0:
                    try:
                        self.end_of_epoch(self.step // self.iters_per_epoch)
                    except DivergenceError as exc:  # the epoch's state failed its health check
                        self._roll_back(exc)
                for callback in self.callbacks:  # the iteration is done, its epoch's end included
                    callback.on_iteration_end(self)
            if self.total_iters == 0:  # post-training calibration only: evaluate and save what was built
                self.end_of_epoch(0)
        finally:
            bar.close()
            self.logger.flush()
            self.lock.release()
        summary = run_summary(self.run, self.progress, self.run_dir)
        if self.run_dir is not None:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        self.reporter.finish(summary)
        if world_size() > 1:  # no rank goes on (e.g. to load ckpt/final.pt) before rank 0 has written it
            torch.distributed.barrier()
        return summary

    def diverged(self, what: str) -> DivergenceError:
        return DivergenceError(f"iteration {self.step}, {what}{last_good_state(self.run_dir, self.progress)}")

    def _roll_back(self, exc: DivergenceError) -> None:
        """With ``train.on_nan: rollback``, return to the last checkpoint and continue with other
        random draws; otherwise (or when out of rollbacks, or with no checkpoint) re-raise."""
        last = self.shared_run_dir / "ckpt" / "last.pt" if self.shared_run_dir else None
        tc = self.config.train
        if tc.on_nan != "rollback" or not (last and last.exists()) or self.rollbacks >= tc.max_rollbacks:
            raise exc
        self.progress.rollbacks += 1
        wall = self.progress.wall()  # the time since that checkpoint was spent all the same
        restore(self.run, self.progress, self.scaler, safe_load(last, map_location=self.runtime.device))
        self.progress.set_wall(wall)
        seed_everything(self.config.seed + rank() + 1000 * self.rollbacks)  # the same draws would diverge again
        self.reporter.pending.clear()
        self.finite.reset(self.step)
        self.logger.scalars(self.step, {"nan/rollbacks": self.rollbacks})
        message = f"{exc}; rolled back to iteration {self.step} ({self.rollbacks}/{tc.max_rollbacks})"
        self.logger.text(self.step, "nan/rollback", message)
        print(f"dfkd: {message}", file=sys.stderr)

    def _flush(self) -> None:
        extra = {**{f"lr/{n}": p.lr for n, p in self.players.items()},
                 **{f"time/{k}_s": v for k, v in self.progress.timers.items() if k != "synthesis" or self.synth}}
        synthetic = self.synth.last.images if self.synth is not None and self.synth.last is not None else None
        self.reporter.flush(self.step, extra, synthetic)

    def end_of_epoch(self, epoch: int) -> None:
        tc, oc, progress = self.config.train, self.config.output, self.progress
        last_epoch = self.step == self.total_iters
        record, result = {"epoch": epoch, "step": self.step}, None
        if self.test_loader is not None and (epoch % tc.eval_every == 0 or last_epoch):
            t0 = time.perf_counter()
            result = self.evaluate(self.student.eval_module, student=True)
            scalars = {}
            if self.student.ema is not None:  # the live weights too, to see what the average adds
                scalars["eval/acc_live"] = record["acc_live"] = self.evaluate(self.student.module, student=True)["acc"]
            progress.timers["eval"] += time.perf_counter() - t0
            record.update(acc=result["acc"], loss=result["loss"], time_train_s=round(progress.timers["train"], 2),
                          **{k: result[k] for k in ("exits", "exit_ensemble") if k in result})
            self.reporter.evaluation(self.step, epoch, result, max(progress.best_acc, result["acc"]),
                                     progress.teacher_acc, scalars)
            for callback in self.callbacks:
                callback.on_evaluation(self, epoch, result)
        elif self.synth is not None and self.synth.heldout is not None and (epoch % tc.eval_every == 0 or last_epoch):
            record["agreement"] = held_out_agreement(self.run)  # no labeled image: agreement on held-out samples
            self.reporter.agreement(self.step, epoch, record["agreement"])
        norms = weight_norms(self.run)  # nothing is kept of a state that fails its health check
        problem = health_problem(norms, progress, result["loss"] if result else None, tc.max_weight_growth)
        if problem:
            raise self.diverged(problem)
        if not last_epoch and (stop := stop_reason(tc.stop_at, [*progress.history, record], progress.teacher_acc)):
            progress.stopped, last_epoch = stop, True  # this epoch ends the run: saved as its last one
            self.reporter.note(self.step, "train/stopped", f"{stop}; the run ends at iteration {self.step}")
        if result is not None and result["acc"] > progress.best_acc:
            progress.best_acc = result["acc"]
            if self.run_dir is not None:
                save_student(self.run, self.run_dir, "best.pt", result["acc"], epoch, self.step)
        if epoch % oc.image_every == 0 or last_epoch:
            self.reporter.epoch_images(self.step, self.synth.last.images if self.synth and self.synth.last else None)
        progress.history.append(record)
        progress.good_step, progress.good_norms = self.step, norms
        if self.run_dir is not None:
            if last_epoch:
                save_student(self.run, self.run_dir, "final.pt", record.get("acc"), epoch, self.step)
            if epoch % oc.save_every == 0 or last_epoch:
                save_state(self.run, progress, self.scaler, self.run_dir)
                for callback in self.callbacks:
                    callback.on_checkpoint(self, epoch)
        for callback in self.callbacks:
            callback.on_epoch_end(self, epoch, record)
