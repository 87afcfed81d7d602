"""The audit's measures: nearest-neighbour distances of synthetic samples to training and test
images, and membership inference (loss threshold, offline and online LiRA, canary exposure) with
its scores (ROC AUC, true-positive rate at a fixed false-positive rate)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_distances(queries: torch.Tensor, references: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the Euclidean distance to its nearest reference row and that row's index."""
    best, where = [], []
    for q in queries.split(chunk):
        d = torch.cdist(q.float().flatten(1), references.float().flatten(1))
        value, index = d.min(1)
        best.append(value)
        where.append(index)
    return torch.cat(best), torch.cat(where)


def memorization(synthetic: torch.Tensor, train: torch.Tensor, test: torch.Tensor, margin: float) -> dict:
    """Distances of ``synthetic`` rows to their nearest ``train`` and ``test`` rows, the ratio
    d_train / d_test per sample (quantiles, mean), and the fraction with d_train < (1 − margin)·d_test."""
    d_train, nearest = nearest_distances(synthetic, train)
    d_test, _ = nearest_distances(synthetic, test)
    ratio = d_train / d_test.clamp_min(1e-12)
    quantiles = torch.quantile(ratio, torch.tensor([0.01, 0.1, 0.5, 0.9]))
    return {"ratio_mean": float(ratio.mean()), "ratio_q01": float(quantiles[0]), "ratio_q10": float(quantiles[1]),
            "ratio_median": float(quantiles[2]), "ratio_q90": float(quantiles[3]),
            "closer_to_train": float((d_train < (1 - margin) * d_test).float().mean()),
            "d_train_mean": float(d_train.mean()), "d_test_mean": float(d_test.mean()),
            "_ratio": ratio, "_d_train": d_train, "_nearest": nearest}


def roc_auc(members: torch.Tensor, non_members: torch.Tensor) -> float:
    """P(score of a member > score of a non-member), ties counting one half (Mann-Whitney U)."""
    scores = torch.cat([members, non_members]).double()
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    for value in scores.unique():  # average ranks over ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    m, n = len(members), len(non_members)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def tpr_at_fpr(members: torch.Tensor, non_members: torch.Tensor, fpr: float) -> float:
    """The fraction of members scored above the threshold that only ``fpr`` of non-members exceed."""
    threshold = torch.quantile(non_members.double(), 1 - fpr)
    return float((members.double() > threshold).float().mean())


@torch.no_grad()
def losses_of(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([F.cross_entropy(model(x), y, reduction="none") for x, y in zip(images.split(batch),
                                                                                     labels.split(batch))])


def attack_scores(members: torch.Tensor, non_members: torch.Tensor) -> dict:
    """How well scores (higher: "member") separate members from non-members: ROC AUC and the
    true-positive rate at 1% and 0.1% false positives."""
    return {"auc": roc_auc(members, non_members), "tpr_at_1pct_fpr": tpr_at_fpr(members, non_members, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(members, non_members, 0.001)}


def loss_attack(model, members: tuple[torch.Tensor, torch.Tensor], non_members: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Loss-threshold membership inference: a lower loss means "member"."""
    return attack_scores(-losses_of(model, *members), -losses_of(model, *non_members))


@torch.no_grad()
def true_class_logit(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """LiRA's statistic: log p_y − log(1 − p_y) of the true class y, computed stably from logits."""
    model.eval()
    out = []
    for x, y in zip(images.split(batch), labels.split(batch)):
        z = model(x).float()
        own = z.gather(1, y[:, None])[:, 0]
        others = z.scatter(1, y[:, None], float("-inf")).logsumexp(1)
        out.append(own - others)
    return torch.cat(out)


def lira_offline(targets: dict, shadows: list, members: tuple, non_members: tuple) -> dict:
    """Offline LiRA (Carlini et al. 2022): each sample's statistic under the target, standardized by
    its mean and spread under shadow models that never trained on it (members and non-members
    alike are outside every shadow's data); a high score means "member"."""
    def per_sample(images, labels):
        values = torch.stack([true_class_logit(s, images, labels) for s in shadows])
        return values.mean(0), values.std(0).clamp_min(1e-3)

    out = {}
    stats = {"in": per_sample(*members), "out": per_sample(*non_members)}
    for who, model in targets.items():
        scores = {k: (true_class_logit(model, *(members if k == "in" else non_members)) - mu) / sd
                  for k, (mu, sd) in stats.items()}
        out[who] = attack_scores(scores["in"], scores["out"])
    return out


def lira_online(targets: dict, shadows: list, keep: torch.Tensor, pool: tuple, members: torch.Tensor,
                non_members: torch.Tensor) -> dict:
    """Online LiRA (Carlini et al. 2022): every pool sample trained ``keep[i, j]`` shadow i on it
    (each in exactly half of them); its statistic under the target is compared with Gaussians fitted
    to it under the shadows that trained on it (IN) and those that did not (OUT). Per-sample means
    and, as Carlini et al. advise for few shadow models, one variance per side shared by all
    samples; the log-likelihood ratio IN/OUT is the score. ``members``/``non_members``: indices
    into ``pool`` of the evaluated target members and non-members."""
    values = torch.stack([true_class_logit(s, *pool) for s in shadows]).double()   # (shadows, pool)
    keep = keep.double()
    mu_in = (values * keep).sum(0) / keep.sum(0)
    mu_out = (values * (1 - keep)).sum(0) / (1 - keep).sum(0)
    sd_in = ((values - mu_in) ** 2 * keep).sum().div(keep.sum()).sqrt().clamp_min(1e-3)
    sd_out = ((values - mu_out) ** 2 * (1 - keep)).sum().div((1 - keep).sum()).sqrt().clamp_min(1e-3)
    out = {}
    for who, model in targets.items():
        x = true_class_logit(model, *pool).double()
        score = (-0.5 * ((x - mu_in) / sd_in) ** 2 - sd_in.log()) - (-0.5 * ((x - mu_out) / sd_out) ** 2 - sd_out.log())
        out[who] = attack_scores(score[members], score[non_members])
    return out


def canary_exposure(models: dict, canaries: tuple[torch.Tensor, torch.Tensor],
                    reference: tuple[torch.Tensor, torch.Tensor], fpr: float = 0.01) -> dict:
    """How many planted canaries (training images relabeled to another class) each model gives a
    loss below what only ``fpr`` of ``reference`` samples get: unseen test images, each under a
    random wrong label, as the canaries would be under their planted ones had they not been seen."""
    found = {}
    for who, model in models.items():
        canary_scores, reference_scores = -losses_of(model, *canaries), -losses_of(model, *reference)
        threshold = torch.quantile(reference_scores.double(), 1 - fpr)
        found[who] = int((canary_scores.double() > threshold).sum())
    return {"planted": len(canaries[1]), "fpr": fpr, "found": found}
