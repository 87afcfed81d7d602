"""Each loss term against a value worked out by hand on a few numbers."""
import math
from types import SimpleNamespace

import pytest
import torch

from dfkd.methods.losses.base import build_terms
from dfkd.methods.losses.contrastive import Contrastive
from dfkd.methods.losses.datafree import (activation_norm, adv_kl, adv_l1, bn_stats, class_balance, competition,
                                          l2_prior, onehot_ce, tv)
from dfkd.methods.losses.feature import attention
from dfkd.methods.losses.response import kd_kl
from dfkd.nets.taps import BN_INPUT_MEANS, BNStats
from dfkd_base.errors import ConfigError, ShapeError

LN3 = math.log(3)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- response-based terms
def test_kd_kl_hand_example():
    # At T=2, teacher logits (2 ln 3, 0) give p_t = (3/4, 1/4); student (0, 0) gives (1/2, 1/2).
    # The second sample's logits are identical, so its KL is 0.
    ctx = SimpleNamespace(teacher_logits=t([2 * LN3, 0.0], [1.0, 2.0]), student_logits=t([0.0, 0.0], [1.0, 2.0]))
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_kl(ctx, T=2).item() == approx(2 * 2 * kl / 2)
    same = SimpleNamespace(teacher_logits=t([3.0, -1.0, 0.5]), student_logits=t([3.0, -1.0, 0.5]))
    assert kd_kl(same, T=4).item() == approx(0.0)


def test_onehot_ce_targets():
    # Softmax of (ln 2, 0, 0) is (1/2, 1/4, 1/4); of (0, ln 3, 0) it is (1/5, 3/5, 1/5).
    ctx = SimpleNamespace(teacher_logits=t([math.log(2), 0.0, 0.0], [0.0, LN3, 0.0]), labels=torch.tensor([2, 0]))
    assert onehot_ce(ctx).item() == approx((math.log(2) + math.log(5 / 3)) / 2)
    assert onehot_ce(ctx, target="labels").item() == approx((math.log(4) + math.log(5)) / 2)
    with pytest.raises(ConfigError, match="onehot_ce.target must be one of argmax, labels"):
        onehot_ce(ctx, target="max")


def test_activation_norm():
    ctx = SimpleNamespace(teacher_embedding=t([1.0, -2.0], [3.0, -4.0]))
    assert activation_norm(ctx).item() == approx(-2.5)


def test_class_balance():
    # Softmax rows (3/4, 1/4) and (1/4, 3/4) average to uniform: zero.
    balanced = SimpleNamespace(teacher_logits=t([LN3, 0.0], [0.0, LN3]))
    assert class_balance(balanced).item() == approx(0.0)
    skewed = SimpleNamespace(teacher_logits=t([LN3, 0.0], [LN3, 0.0]))
    assert class_balance(skewed).item() == approx(0.75 * math.log(0.75) + 0.25 * math.log(0.25) + math.log(2))
    # A class whose mean probability underflows to 0 contributes 0, not NaN.
    certain = SimpleNamespace(teacher_logits=t([1000.0, 0.0], [1000.0, 0.0]))
    assert class_balance(certain).item() == approx(math.log(2))


def test_adv_l1_value_and_gradient_to_images():
    images = t([1.0, 2.0]).requires_grad_()
    # student = x·I = (1, 2), teacher = x·2I = (2, 4): mean |s − t| = 1.5.
    ctx = SimpleNamespace(student_logits=images @ torch.eye(2), teacher_logits=images @ (2 * torch.eye(2)))
    loss = adv_l1(ctx)
    assert loss.item() == approx(-1.5)
    loss.backward()
    # d/dx of −½ Σ_k |x_k − 2 x_k| = −½ Σ_k |x_k| is −½ sign(x).
    assert torch.allclose(images.grad, t([-0.5, -0.5]))


def test_adv_kl_and_agreement_mask():
    # Teacher (3/4, 1/4) on both samples; student (2/3, 1/3) agrees on the first, (1/3, 2/3) disagrees on the second.
    teacher = t([LN3, 0.0], [LN3, 0.0])
    student = t([math.log(2), 0.0], [0.0, math.log(2)])
    kl_agree = 0.75 * math.log(0.75 / (2 / 3)) + 0.25 * math.log(0.25 / (1 / 3))
    kl_disagree = 0.75 * math.log(0.75 / (1 / 3)) + 0.25 * math.log(0.25 / (2 / 3))
    ctx = SimpleNamespace(teacher_logits=teacher, student_logits=student)
    assert adv_kl(ctx).item() == approx(-(kl_agree + kl_disagree) / 2)
    assert adv_kl(ctx, agreement_mask=True).item() == approx(-kl_agree / 2)
    # Doubled logits at T=2 give the same distributions, and no T² factor.
    hot = SimpleNamespace(teacher_logits=2 * teacher, student_logits=2 * student)
    assert adv_kl(hot, T=2).item() == approx(adv_kl(ctx).item())


def test_competition_is_adis_clamped_reverse_kl_divergence():
    # At T=3, teacher (3 ln 3, 0) gives Q = (3/4, 1/4), student (0, 0) gives P = (1/2, 1/2); M = (5/8, 3/8).
    # ADI's code takes KL(M || P) and KL(M || Q), not the textbook's KL(P || M) and KL(Q || M).
    ctx = SimpleNamespace(teacher_logits=t([3 * LN3, 0.0]), student_logits=t([0.0, 0.0]))
    js = 0.5 * (0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.5)) \
        + 0.5 * (0.625 * math.log(0.625 / 0.75) + 0.375 * math.log(0.375 / 0.25))
    assert competition(ctx).item() == approx(1 - js)
    # A confident teacher: Q = (1 - 1e-4, 1e-4) at T=1 is clamped to (0.99, 0.01); M = (0.75, 0.25) is
    # taken before the clamp and is inside it.
    confident = SimpleNamespace(teacher_logits=t([math.log(1e4 - 1), 0.0]), student_logits=t([0.0, 0.0]))
    q_m = 0.75 - 0.5e-4
    js = 0.5 * (q_m * math.log(q_m / 0.5) + (1 - q_m) * math.log((1 - q_m) / 0.5)) \
        + 0.5 * (q_m * math.log(q_m / 0.99) + (1 - q_m) * math.log((1 - q_m) / 0.01))
    assert competition(confident, T=1.0).item() == approx(1 - js)
    same = SimpleNamespace(teacher_logits=t([1.0, 2.0, 3.0]), student_logits=t([1.0, 2.0, 3.0]))
    assert competition(same).item() == approx(1.0)


# ---------------------------------------------------------------- features and images
def test_attention_hand_example():
    # Student channels (1, 0) and (1, 2): mean of squares (1, 2) → (1, 2)/√5. Teacher (3, 0) → (1, 0).
    student = {"s1": torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]]), "s2": torch.ones(1, 4, 2, 2)}
    teacher = {"t1": torch.tensor([[[[3.0, 0.0]]]]), "t2": torch.full((1, 2, 2, 2), 5.0)}
    ctx = SimpleNamespace(student_features=student, teacher_features=teacher)
    pairs = [["s1", "t1"], ["s2", "t2"]]  # the second pair has equal (uniform) maps: contributes 0
    expected = ((1 / math.sqrt(5) - 1) ** 2 + (2 / math.sqrt(5)) ** 2) / 2
    assert attention(ctx, pairs).item() == approx(expected)
    assert attention.taps({"pairs": pairs}) == {"student": ["s1", "s2"], "teacher": ["t1", "t2"]}


def test_attention_shape_mismatch_names_both_layers():
    ctx = SimpleNamespace(student_features={"layer1": torch.ones(1, 2, 4, 4)},
                          teacher_features={"layer2": torch.ones(1, 2, 2, 2)})
    with pytest.raises(ShapeError, match=r"student 'layer1' has spatial size \(4, 4\), teacher 'layer2' has \(2, 2\)"):
        attention(ctx, [["layer1", "layer2"]])


def bn_layer(name, mean, var, running_mean, running_var, dtype=torch.float32):
    return BNStats(name, torch.tensor(mean, dtype=dtype), torch.tensor(var, dtype=dtype),
                   torch.tensor(running_mean), torch.tensor(running_var))


def test_bn_stats_two_layers():
    layers = [bn_layer("bn1", [1.0, 2.0], [1.0, 1.0], [1.0, 0.0], [4.0, 1.0]),
              bn_layer("bn2", [3.0], [2.0], [0.0], [2.0])]
    ctx = SimpleNamespace(teacher_bn=layers)
    # l2: layer 1 ‖(0, 2)‖ + ‖(−3, 0)‖ = 5, layer 2 ‖3‖ + 0 = 3.
    assert bn_stats(ctx).item() == approx(5 + 3)
    assert bn_stats(ctx, first_layer_weight=10).item() == approx(10 * 5 + 3)
    # mse: layer 1 (0 + 4)/2 + (9 + 0)/2 = 6.5, layer 2 9 + 0.
    assert bn_stats(ctx, first_layer_weight=10, norm="mse").item() == approx(10 * 6.5 + 9)
    with pytest.raises(ConfigError, match="bn_stats.norm must be one of l2, mse"):
        bn_stats(ctx, norm="l1")
    assert bn_stats(ctx, layers="mean").item() == approx((5 + 3) / 2)  # the teacher's depth divided out
    with pytest.raises(ConfigError, match="bn_stats.layers must be one of sum, mean"):
        build_terms({"bn_stats": {"layers": "max"}}, "losses")


def test_bn_stats_zero_at_running_stats_and_float32_from_bf16():
    matched = SimpleNamespace(teacher_bn=[bn_layer("bn", [0.5, -1.0], [2.0, 0.25], [0.5, -1.0], [2.0, 0.25])])
    assert bn_stats(matched).item() == 0.0
    bf16 = SimpleNamespace(teacher_bn=[bn_layer("bn", [1.0], [2.0], [0.0], [1.0], dtype=torch.bfloat16)])
    loss = bn_stats(bf16)
    assert loss.dtype == torch.float32 and loss.item() == approx(2.0)


def test_bn_stats_momentum_blends_earlier_batches():
    from dfkd.methods.losses.datafree import BNStatistics

    term = BNStatistics(momentum=0.9)
    first = SimpleNamespace(teacher_bn=[bn_layer("bn", [1.0], [1.0], [0.0], [1.0])])
    second = SimpleNamespace(teacher_bn=[bn_layer("bn", [3.0], [1.0], [0.0], [1.0])])
    assert term(first).item() == approx(1.0)  # no earlier batch: |1 - 0| + |1 - 1|
    assert term(second).item() == approx(3.0)  # the batch is not done: its own statistics still count alone
    term.end_batch()  # the batch done last was 'second' (mean 3)
    # next batch: mean 0.9·3 + 0.1·1 = 2.8 against 0, variance 0.9·1 + 0.1·1 = 1 against 1
    assert term(first).item() == approx(2.8)
    term.end_batch()  # running: 0.9·3 + 0.1·1 = 2.8
    restored = BNStatistics(momentum=0.9)
    restored.load_state_dict(term.state_dict())
    assert restored(first).item() == approx(0.9 * 2.8 + 0.1 * 1.0)
    assert BNStatistics()(second).item() == approx(3.0)  # momentum 0: the plain term
    with pytest.raises(ConfigError, match=r"bn_stats.momentum must be in \[0, 1\), got 1.0"):
        BNStatistics(momentum=1.0)


def test_tv_both_norms():
    # One 2×2 image [[1, 2], [4, 8]]: horizontal (−1, −4), vertical (−3, −6), diagonals 4 − 2 and 1 − 8.
    ctx = SimpleNamespace(teacher_images=torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]]))
    assert tv(ctx).item() == approx(math.sqrt(17) + math.sqrt(45) + 2 + 7)
    assert tv(ctx, norm="l1").item() == approx(2.5 + 4.5 + 2 + 7)
    with pytest.raises(ConfigError, match="tv.norm"):
        tv(ctx, norm="l3")


def test_l2_prior():
    ctx = SimpleNamespace(teacher_images=torch.tensor([[[[3.0, 4.0]]], [[[6.0, 8.0]]]]))
    assert l2_prior(ctx).item() == approx((5 + 10) / 2)


# ---------------------------------------------------------------- contrastive
def contrastive_ctx(plain, global_features, local_features):
    """A fake context: the teacher's BN-input means are ``global_features`` on the batch and
    ``local_features`` on any other view of it."""
    return SimpleNamespace(batch=SimpleNamespace(plain=plain), teacher_images=plain,
                           teacher_features={BN_INPUT_MEANS: global_features},
                           teacher_view=lambda view: (None, {BN_INPUT_MEANS: local_features}))


def identity_head(term, d):
    """The projection head as ReLU then identity: non-negative features pass unchanged."""
    term.build_head(d)
    with torch.no_grad():
        for layer in (term.head[0], term.head[2]):
            layer.weight.copy_(torch.eye(d))
            layer.bias.zero_()


def test_contrastive_hand_example_local_view_against_detached_global_views():
    term = Contrastive(T=0.5, dim=2)
    identity_head(term, 2)
    glob, local = t([1.0, 0.0], [0.0, 1.0]), t([1.0, 0.0], [1.0, 1.0])
    loss = term(contrastive_ctx(torch.zeros(2, 1, 8, 8), glob, local))
    # anchors (1, 0) and (1, 1)/√2 against keys (1, 0), (0, 1) at T = 0.5: logits (2, 0) and (√2, √2)
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert loss.item() == approx(expected)


def test_contrastive_bank_takes_the_kept_steps_raw_features_once_per_batch():
    torch.manual_seed(0)
    term = Contrastive(bank_size=5, negatives=3, dim=3)
    term.build_head(2)
    images = torch.zeros(2, 1, 8, 8)
    steps = [(torch.rand(2, 2), torch.rand(2, 2)) for _ in range(3)]
    for i, (glob, local) in enumerate(steps):
        term(contrastive_ctx(images, glob, local))
        if i == 1:
            term.keep_step()  # synthesis keeps the second step's batch
        assert term.bank is None  # nothing enters the bank during the inner loop
    term.end_batch()
    glob, local = steps[1]
    assert len(term.bank) == 2 and term.bank.cursor == 2
    assert torch.equal(term.bank.columns["features"][:2], torch.cat([local, glob], dim=1))  # raw, not projections
    # the next batch's steps draw min(negatives, filled) bank rows, re-projected by the current head
    calls = []
    original = term.project
    term.project = lambda x: calls.append(len(x)) or original(x)
    term(contrastive_ctx(images, glob, local))
    assert calls == [4, 4]  # 2 anchors + 2 cached local rows; 2 keys + 2 cached global rows
    for _ in range(2):  # two more kept batches: the FIFO wraps, keeping the newest 5 rows
        term(contrastive_ctx(images, glob, local))
        term.keep_step()
        term.end_batch()
    assert len(term.bank) == 5 and term.bank.cursor == 1
    state = term.state_dict()
    assert "head.0.weight" in state and state["_extra_state"]["bank"]["cursor"] == 1
    restored = Contrastive(bank_size=5, negatives=3, dim=3)
    restored.build_head(2)
    restored.load_state_dict(state)  # the bank comes back whole, and goes on where it was
    assert torch.equal(restored.bank.columns["features"], term.bank.columns["features"]) and restored.bank.cursor == 1


def test_contrastive_gradient_reaches_images_through_the_local_view_only():
    torch.manual_seed(0)
    images, weight = torch.randn(4, 3, 16, 16, requires_grad=True), torch.randn(3, 6)
    glob = images.mean((2, 3)) @ weight  # global features with a graph: the term must not use it
    ctx = SimpleNamespace(batch=SimpleNamespace(plain=images), teacher_images=images,
                          teacher_features={BN_INPUT_MEANS: glob},
                          teacher_view=lambda view: (None, {BN_INPUT_MEANS: view.mean((2, 3)) @ weight}))
    term = Contrastive(dim=4)
    term.build_head(6)
    loss = term(ctx)
    (global_grad,) = torch.autograd.grad(loss, glob, retain_graph=True, allow_unused=True)
    assert global_grad is None  # the global view is the detached key
    loss.backward()
    assert images.grad.abs().sum() > 0 and term.head[0].weight.grad is not None


def test_contrastive_requires_build():
    with pytest.raises(RuntimeError, match="build"):
        Contrastive()(contrastive_ctx(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4), torch.zeros(2, 4)))


# ---------------------------------------------------------------- build_terms
def test_build_terms_instantiates_class_terms():
    (term,) = build_terms({"contrastive": {"weight": 0.8, "T": 0.1, "bank_size": 16}}, "phases.0.losses")
    assert isinstance(term.term, Contrastive) and term.weight == 0.8
    assert term.term.needs == ("teacher",) and term.term.taps() == {"teacher": [BN_INPUT_MEANS], "student": []}
    term.term.build_head(4)
    assert term.term.T == 0.1 and term.term.bank_size == 16 and term.term.head[2].out_features == 256
    ctx = contrastive_ctx(torch.zeros(2, 3, 8, 8), torch.rand(2, 4), torch.rand(2, 4))
    assert torch.isfinite(term(ctx))


def test_build_terms_rejects_bad_params_and_weights():
    with pytest.raises(ConfigError, match="phases.0.losses.contrastive: loss term 'contrastive' has no parameter "
                                          "'bank_sise'; did you mean 'bank_size'"):
        build_terms({"contrastive": {"bank_sise": 16}}, "phases.0.losses")
    with pytest.raises(ConfigError, match="phases.0.losses.kd_kl.weight must be a number, got 'high'"):
        build_terms({"kd_kl": "high"}, "phases.0.losses")
    with pytest.raises(ConfigError, match="loss term 'attention' needs parameter pairs"):
        build_terms({"attention": 250}, "phases.0.losses")


def test_build_terms_tagged_duplicates():
    terms = build_terms({"kd_kl": 1, "kd_kl@soft": {"weight": 0.5, "T": 4}}, "phases.0.losses")
    assert [(term.name, term.weight, term.params) for term in terms] == [
        ("kd_kl", 1.0, {}), ("kd_kl@soft", 0.5, {"T": 4})]
    ctx = SimpleNamespace(teacher_logits=t([2.0, 0.0]), student_logits=t([0.0, 1.0]))
    assert terms[1](ctx).item() == approx(kd_kl(ctx, T=4).item())
    assert terms[0](ctx).item() != approx(terms[1](ctx).item())


# ---------------------------------------------------------------- relation-based and decoupled terms
def relation_ctx(student, teacher):
    from dfkd.nets.taps import EMBEDDING
    return SimpleNamespace(student_features={EMBEDDING: student}, teacher_features={EMBEDDING: teacher})


def smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_distance_hand_example():
    from dfkd.methods.losses.relation import rkd_distance

    # teacher: a 3-4-5 triangle, mean distance 4 -> 0.75, 1, 1.25; student: a right isosceles one
    teacher, student = t([0, 0], [3, 0], [0, 4]), t([0, 0], [1, 0], [0, 1])
    m = (2 + math.sqrt(2)) / 3
    pairs = [(1 / m, 0.75), (1 / m, 1.0), (math.sqrt(2) / m, 1.25)]  # (0,1), (0,2), (1,2), each twice
    expected = 2 * sum(smooth_l1(s - t_) for s, t_ in pairs) / 9
    assert rkd_distance(relation_ctx(student, teacher)).item() == approx(expected)
    assert rkd_distance(relation_ctx(2 * teacher, teacher)).item() == approx(0.0)  # scale-free


def test_rkd_angle_hand_example():
    from dfkd.methods.losses.relation import rkd_angle

    # teacher: right isosceles triangle (cosines 0 at the right angle, 1/√2 at the others);
    # student: equilateral (0.5 everywhere); each vertex contributes its two off-diagonal cosines
    teacher = t([0, 0], [1, 0], [0, 1])
    student = t([0, 0], [1, 0], [0.5, math.sqrt(3) / 2])
    expected = (2 * smooth_l1(0.5) + 4 * smooth_l1(0.5 - 1 / math.sqrt(2))) / 27
    assert rkd_angle(relation_ctx(student, teacher)).item() == approx(expected)


def test_sp_hand_example():
    from dfkd.methods.losses.relation import similarity_preserving
    student, teacher = t([1, 0], [0, 1]), t([1, 0], [1, 0])
    # G_S = I (rows already unit); G_T = [[1, 1], [1, 1]] -> rows (1/√2, 1/√2)
    r = 1 / math.sqrt(2)
    expected = (2 * (1 - r) ** 2 + 2 * r ** 2) / 4
    assert similarity_preserving(relation_ctx(student, teacher)).item() == approx(expected)


def test_pkt_hand_example():
    from dfkd.methods.losses.relation import pkt
    student, teacher = t([1, 0], [0, 1]), t([1, 0], [1, 0])
    # student cosines [[1, 0], [0, 1]] -> (s+1)/2 = [[1, .5], [.5, 1]] -> rows (2/3, 1/3);
    # teacher cosines all 1 -> rows (1/2, 1/2); KL(teacher ‖ student) per entry, mean over 4 entries
    row = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert pkt(relation_ctx(student, teacher)).item() == pytest.approx(2 * row / 4, rel=1e-4)


def test_relation_terms_need_the_same_samples_from_both_networks():
    from dfkd.methods.losses.relation import rkd_distance
    with pytest.raises(ShapeError, match="holds 3 samples and the teacher's '<embedding>' 2"):
        rkd_distance(relation_ctx(torch.randn(3, 4), torch.randn(2, 4)))


def test_fsp_hand_example_and_channel_mismatch():
    from dfkd.methods.losses.relation import fsp
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])            # (1, 1, 2, 2)
    b = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    c = torch.tensor([[[[2.0]]]])                              # (1, 1, 1, 1): a and b pooled to 1x1
    ctx = SimpleNamespace(student_features={"a": a, "b": b, "c": c},
                          teacher_features={"a": a, "b": 2 * b, "c": c})
    # student FSP(a, b) = (1 + 4) / 4; teacher's = 2 * that; FSP(b, c): mean(b) * 2 = 1 vs mean(2b) * 2 = 2
    expected = (1.25 - 2.5) ** 2 + (1.0 - 2.0) ** 2
    assert fsp(ctx, student=["a", "b", "c"], teacher=["a", "b", "c"]).item() == approx(expected)
    ctx.teacher_features["b"] = torch.ones(1, 3, 2, 2)
    with pytest.raises(ShapeError, match=r"student's FSP matrix is \(1, 1\), the teacher's \(1, 3\)"):
        fsp(ctx, student=["a", "b"], teacher=["a", "b"])


def test_dkd_rebuilds_classical_kd_from_its_two_parts():
    from dfkd.methods.losses.response import dkd

    # DKD's identity: KD = TCKD + (1 - p_t) NCKD, p_t the teacher's target probability (one sample)
    torch.manual_seed(0)
    s, te, y, T = torch.randn(1, 5), torch.randn(1, 5), torch.tensor([2]), 4.0
    ctx = SimpleNamespace(student_logits=s, teacher_logits=te, labels=y, epoch=0)
    p_target = (te / T).softmax(1)[0, 2].item()
    rebuilt = dkd(ctx, alpha=1.0, beta=1 - p_target, T=T, warmup=1)
    assert rebuilt.item() == approx(kd_kl(ctx, T=T).item())
    # warm-up: epoch 0 of 20 counts 1/20, epoch 19 and later fully
    full = dkd(SimpleNamespace(student_logits=s, teacher_logits=te, labels=y, epoch=19))
    assert dkd(ctx).item() == approx(full.item() / 20)
    assert dkd(SimpleNamespace(student_logits=s, teacher_logits=te, labels=y, epoch=50)).item() == approx(full.item())


def nce_by_hand(scores, n):
    k, noise = len(scores) - 1, 1 / n
    return -(math.log(scores[0] / (scores[0] + k * noise + 1e-7))
             + sum(math.log(k * noise / (s + k * noise + 1e-7)) for s in scores[1:]))


def test_crd_scores_each_embedding_against_the_other_networks_memory_and_then_updates_it():
    from dfkd.methods.losses.contrastive import ContrastiveRepresentation
    from dfkd.nets.taps import EMBEDDING

    crd = ContrastiveRepresentation(dim=2, negatives=3, T=0.5, momentum=0.5)
    crd.build_memory(2, 2, torch.tensor([0, 0, 1, 1]))
    with torch.no_grad():
        for embed in (crd.embed_student, crd.embed_teacher):
            embed.weight.copy_(torch.eye(2))
            embed.bias.zero_()
        crd.memory_teacher.copy_(t([0, 1], [5, 5], [0, 1], [0, 1]))   # samples 2, 3 (class 1) alike, so
        crd.memory_student.copy_(t([0.6, 0.8], [5, 5], [-1, 0], [-1, 0]))  # any negative draw scores the same
    batch = SimpleNamespace(index=torch.tensor([0]), source="real")
    ctx = SimpleNamespace(batch=batch, student_features={EMBEDDING: t([3, 4])}, teacher_features={EMBEDDING: t([1, 0])})
    loss = crd(ctx)
    # student v = (0.6, 0.8) against teacher memory rows 0, then three of {2, 3}; teacher v = (1, 0) likewise
    s = [math.exp(0.8 / 0.5)] * 4
    tt = [math.exp(0.6 / 0.5)] + [math.exp(-1 / 0.5)] * 3
    z_s, z_t = sum(s) / 4 * 4, sum(tt) / 4 * 4
    expected = nce_by_hand([x / z_s for x in s], 4) + nce_by_hand([x / z_t for x in tt], 4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    r = 1 / math.sqrt(2)  # sample 0's rows moved halfway to its new embeddings, renormalized
    assert torch.allclose(crd.memory_teacher[0], t([r, r])[0])
    assert torch.allclose(crd.memory_student[0], t([0.6, 0.8])[0])
    assert torch.allclose(crd.memory_teacher[1], t([5, 5])[0])  # other samples untouched
    z = crd.z.clone()
    crd(ctx)
    assert torch.equal(crd.z, z)  # the normalizers are fixed at the first step
    negatives = crd.sample_negatives(torch.tensor([0, 1, 1]))
    assert set(negatives[0].tolist()) <= {2, 3} and set(negatives[1:].flatten().tolist()) <= {0, 1}


def test_crd_on_batches_without_sample_indices_is_a_one_line_error():
    from dfkd.methods.losses.contrastive import ContrastiveRepresentation

    crd = ContrastiveRepresentation(dim=2, negatives=1)
    crd.build_memory(2, 2, torch.tensor([0, 1]))
    ctx = SimpleNamespace(batch=SimpleNamespace(index=None, source="synthetic"))
    with pytest.raises(ConfigError, match="crd needs each sample's index in the training split; 'synthetic' batches"):
        crd(ctx)


def test_rkd_gives_no_runaway_gradient_to_coinciding_student_embeddings():
    from dfkd.methods.losses.relation import rkd_angle, rkd_distance

    # a thin student whose ReLUs died for two samples: their embeddings coincide (both zero)
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [3.0, 1.0]], requires_grad=True)
    teacher = t([1, 0], [0, 1], [2, 2], [3, 0])
    for term in (rkd_distance, rkd_angle):
        student.grad = None
        term(relation_ctx(student, teacher)).backward()
        assert torch.isfinite(student.grad).all() and student.grad.abs().max() < 10, (term.__name__, student.grad)
    dead = torch.zeros(4, 2, requires_grad=True)  # every embedding the same: no NaN from an empty mean
    assert torch.isfinite(rkd_distance(relation_ctx(dead, teacher))) and torch.isfinite(rkd_angle(relation_ctx(dead, teacher)))
