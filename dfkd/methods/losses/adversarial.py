"""Adversarial and online terms: a discriminator's verdict as a distillation loss (logit, feature
and conditional discriminators, MEAL, AFD) and deep mutual learning between peers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.core.checkpoint import unwrap
from dfkd.methods.losses.base import Feature, PlayerUse, Term, choice, register
from dfkd.methods.losses.response import kd_kl_divergence
from dfkd.nets.discriminators import OBJECTIVES, grad_reverse, gradient_penalty
from dfkd_base.errors import ConfigError, ShapeError


@register("dml")
def dml(ctx, peers: str | list[str], T: float = 1.0) -> torch.Tensor:
    """Deep mutual learning (Zhang et al. 2018): mean over ``peers`` (model players, detached in
    this phase since only its own player trains) of KL(p_peer ‖ p_student) at temperature T, ×T²."""
    peers = [peers] if isinstance(peers, str) else list(peers)
    return sum(kd_kl_divergence(ctx.student_logits, ctx.logits_of(p).detach(), T) for p in peers) / len(peers)


@register("adversarial")
class Adversarial(Term):
    """A discriminator's verdict as a distillation loss. The discriminator player tells the
    ``real`` network's view of a batch (the teacher's by default, or a peer's) from the
    ``fake`` one's (by default "student": the phase's student; in a discriminator's phase, the
    evaluated student, so name the peer there in online distillation). One term, two phases:

    - in the discriminator's phase it is the objective's discriminator loss (plus ``gp`` × the
      gradient penalty for ``wgan-gp``); the discriminator's ``steps`` are its n_critic;
    - in the student's phase it is the objective's generator loss; with ``reverse: true`` it is
      instead the discriminator loss through a gradient-reversal layer, so that one backward
      trains both (MEAL): put the discriminator in that phase's ``also``.

    What is compared: logits (``layer`` unset; ``probs: true`` compares softmax(logits / T)),
    or the feature maps at ``layer`` (real side) and ``student_layer`` (default: the same path),
    the student's passed through ``adapter`` (an adapter player) when shapes differ.
    ``labels`` feeds a projection discriminator: ``batch`` (the batch's labels) or ``teacher``
    (the real side's argmax).

    Logged beside the loss: the discriminator's accuracy on real and fake, and the gradient
    penalty; a discriminator that classifies every sample right for ``patience`` consecutive
    steps is reported (log and TensorBoard), since the student then gets no useful gradient."""

    def __init__(self, discriminator: str, objective: str = "nonsaturating", real: str = "teacher",
                 fake: str = "student", layer: str | None = None, student_layer: str | None = None, adapter: str | None = None,
                 probs: bool = False, T: float = 1.0, labels: str = "none", gp: float = 10.0,
                 reverse: bool = False, patience: int = 200):
        super().__init__()
        self.objective = choice(OBJECTIVES, objective, "adversarial.objective")
        choice({"none": 0, "batch": 0, "teacher": 0}, labels, "adversarial.labels")
        if probs and layer:
            raise ConfigError("adversarial: 'probs' applies to logits; it cannot be combined with 'layer'")
        if real == fake:
            raise ConfigError(f"adversarial: the real and the fake side are both '{real}'")
        self.discriminator, self.real, self.fake, self.adapter = discriminator, real, fake, adapter
        self.layer, self.student_layer = layer, student_layer or layer
        self.probs, self.T, self.labels, self.gp, self.reverse = probs, T, labels, gp, reverse
        self.patience, self.won_for, self.reported = patience, 0, False
        self.needs = ("teacher",) if real == "teacher" else ()

    def taps(self) -> dict[str, list[str]]:
        return {self.real: [self.layer] if self.layer else [],
                self.fake: [self.student_layer] if self.student_layer else []}

    def player_uses(self) -> dict[str, PlayerUse]:
        real, fake = Feature(self.real, self.layer), Feature(self.fake, self.student_layer)
        # a discriminator is sized by the real side; without an adapter the fake side must match it
        uses = {self.discriminator: PlayerUse("discriminator", real, None if self.adapter else fake)}
        if self.adapter:
            uses[self.adapter] = PlayerUse("adapter", fake, real)
        return uses

    def _view(self, ctx, network: str, layer: str | None) -> torch.Tensor:
        if layer is None:
            x = ctx.logits_of(network).float()
            return F.softmax(x / self.T, dim=1) if self.probs else x
        return ctx.features_of(network)[layer].float()

    def forward(self, ctx) -> torch.Tensor:
        disc = ctx.module(self.discriminator)
        real = self._view(ctx, self.real, self.layer).detach()
        fake = self._view(ctx, self.fake, self.student_layer)
        if self.adapter:
            fake = ctx.module(self.adapter)(fake)
        if fake.shape != real.shape:
            raise ShapeError(f"adversarial: the student's {self.student_layer or 'logits'} {tuple(fake.shape[1:])} "
                             f"and the {self.real}'s {self.layer or 'logits'} {tuple(real.shape[1:])} differ; "
                             f"give the term an 'adapter' player")
        labels = None
        if self.labels == "batch":
            labels = ctx.labels
        elif self.labels == "teacher":
            labels = ctx.logits_of(self.real).argmax(1)
        if ctx.phase.player == self.discriminator:  # the discriminator's own phase
            return self._discriminator_loss(ctx, disc, real, fake.detach(), labels)
        if self.reverse:
            return self._discriminator_loss(ctx, disc, real, grad_reverse(fake), labels)
        return self.objective.g_loss(disc(fake, labels))

    def _discriminator_loss(self, ctx, disc, real, fake, labels) -> torch.Tensor:
        # one call on both halves: a DDP-wrapped discriminator must see one forward per backward
        both = disc(torch.cat([real, fake]), None if labels is None else torch.cat([labels, labels]))
        real_scores, fake_scores = both[: len(real)], both[len(real):]
        loss = self.objective.d_loss(real_scores, fake_scores)
        tag = f"adv/{self.discriminator}"
        if self.objective.gradient_penalty:
            penalty = gradient_penalty(unwrap(disc), real, fake, labels)
            ctx.record(f"{tag}/gradient_penalty", penalty)
            loss = loss + self.gp * penalty
        with torch.no_grad():
            cut = self.objective.threshold
            acc_real, acc_fake = (real_scores > cut).float().mean(), (fake_scores <= cut).float().mean()
        ctx.record(f"{tag}/acc_real", acc_real)
        ctx.record(f"{tag}/acc_fake", acc_fake)
        self._watch(ctx, bool(acc_real == 1 and acc_fake == 1))
        return loss

    def _watch(self, ctx, won: bool) -> None:
        self.won_for = self.won_for + 1 if won else 0
        if self.won_for >= self.patience and not self.reported:
            ctx.warn(f"adv/{self.discriminator}/wins",
                     f"iteration {ctx.step}: discriminator '{self.discriminator}' has classified "
                     f"every sample right for {self.won_for} steps; the student gets little gradient "
                     f"(lower its learning rate or steps, or use spectral_norm / a softer objective)")
            self.reported = True
        elif not won:
            self.reported = False
