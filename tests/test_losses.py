# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Tests of `losses_puma`: every loss against a hand computation with plain Python math, the hard-temperature
schedule, argument validation, and a two-process gloo run checked against one process over the whole batch."""

import doctest
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import losses_puma
from losses_puma import (
    DistillationObjective,
    ElasticObjective,
    HiddenStateDistillLoss,
    InfoNCELoss,
    KLDistillLoss,
    MACLoss,
    build_loss,
    gather_features,
    tau_hard_schedule,
)
from numerics import assert_close


# float64 losses by torch and by the pure-Python hand computations below: a few roundings per term, through exp and
# log of logits scaled by 1/tau (up to 50); measured under 2 ulps of the largest value
HAND_ULPS = 64
# float32 losses and gradients of the whole batch in one process vs each half on a rank, gathered and averaged: the
# same terms summed in another order; measured under 2 ulps of the largest value
GATHER_ULPS = 4


# ---------------------------------------------------------------- hand computations on Python lists of floats


def _cos(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _log_softmax(logits):
    log_total = math.log(sum(math.exp(x) for x in logits))
    return [x - log_total for x in logits]


def _hand_contrastive(queries, candidates, target_modality, candidate_modality, tau_intra, tau_inter):
    """Mean over queries of -log softmax at the query's own positive (candidate i)."""
    total = 0.0
    for i, q in enumerate(queries):
        logits = []
        for j, c in enumerate(candidates):
            tau = tau_intra if candidate_modality[j] == target_modality[i] else tau_inter
            logits.append(_cos(q, c) / tau)
        total -= _log_softmax(logits)[i]
    return total / len(queries)


def _pairs(batch=5, dim=4, negatives=0, seed=0):
    """Seeded float64 `(query, positive, negatives or None)`."""
    generator = torch.Generator().manual_seed(seed)

    def draw(rows):
        return torch.randn(rows, dim, generator=generator, dtype=torch.float64)

    return draw(batch), draw(batch), draw(negatives) if negatives else None


# ---------------------------------------------------------------- the schedule


@pytest.mark.parametrize(
    ("progress", "total", "decay", "round_digits", "expected"),
    [
        (0.0, 2.0, 0.5, 3, 0.03),
        (0.5, 2.0, 0.5, 3, 0.023),  # e/E = 0.25: 0.03 * exp(-0.25) = 0.02336
        (1.0, 2.0, 0.5, 3, 0.018),  # the plateau: 0.03 * exp(-0.5) = 0.01820
        (1.9, 2.0, 0.5, 3, 0.018),  # after the plateau the temperature stays
        (0.25, 1.0, 0.2, 3, 0.027),  # 0.03 * exp(-0.1) = 0.02715
        (0.8, 1.0, 0.2, 3, 0.025),  # 0.03 * exp(-0.2) = 0.02456
        (0.25, 1.0, 0.5, None, 0.03 * math.exp(-0.25)),
        (0.75, 1.0, 0.5, None, 0.03 * math.exp(-0.5)),
        (0.1, 1.0, 0.0, None, 0.03),  # no decay
    ],
)
def test_tau_hard_schedule_follows_the_release_formula(progress, total, decay, round_digits, expected):
    tau = tau_hard_schedule(progress, total, tau_norm=0.03, decay=decay, round_digits=round_digits)

    assert tau == pytest.approx(expected, rel=1e-12)


def test_tau_hard_schedule_plateau_sets_where_the_decay_stops():
    # With plateau 1 the exponent is -d * e/E until the end of training.
    assert tau_hard_schedule(0.5, 1.0, plateau=1.0, round_digits=None) == pytest.approx(0.03 * math.exp(-0.25))
    assert tau_hard_schedule(2.0, 1.0, plateau=1.0, round_digits=None) == pytest.approx(0.03 * math.exp(-0.5))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"total_epochs": 0.0}, "total_epochs"),
        ({"progress_epochs": -1.0}, "progress_epochs"),
        ({"tau_norm": 0.0}, "tau_norm"),
        ({"decay": -0.5}, "decay"),
        ({"plateau": 0.0}, "plateau"),
        ({"plateau": 1.5}, "plateau"),
        ({"round_digits": -1}, "round_digits"),
    ],
)
def test_tau_hard_schedule_rejects_a_bad_argument_naming_it(kwargs, name):
    arguments = {"progress_epochs": 0.5, "total_epochs": 2.0, **kwargs}

    with pytest.raises(ValueError, match=rf"{name} must be .*got {kwargs[name]}"):
        tau_hard_schedule(**arguments)


# ---------------------------------------------------------------- InfoNCE and MAC


def test_infonce_matches_hand_computation_on_known_vectors():
    # Given q = (1, 0), (0, 1) and c = (2, 0), (1, 1): cosines 1, 1/sqrt2 for q0 and 0, 1/sqrt2 for q1.
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    positive = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    r = 1 / math.sqrt(2)

    loss = InfoNCELoss(temperature=0.5)(query, positive)["loss"]

    loss_0 = -1 / 0.5 + math.log(math.exp(1 / 0.5) + math.exp(r / 0.5))
    loss_1 = -r / 0.5 + math.log(math.exp(0 / 0.5) + math.exp(r / 0.5))
    assert_close(loss.item(), (loss_0 + loss_1) / 2, dtype=torch.float64, ulps=HAND_ULPS)


def test_infonce_appends_hard_negatives_as_candidates_for_every_query():
    query, positive, negatives = _pairs(batch=3, negatives=6)

    loss = InfoNCELoss(temperature=0.05)(query, positive, negatives=negatives)["loss"]

    candidates = positive.tolist() + negatives.tolist()
    hand = _hand_contrastive(query.tolist(), candidates, [0] * 3, [0] * 9, 0.05, 0.05)
    assert_close(loss.item(), hand, dtype=torch.float64, ulps=HAND_ULPS)


def test_mac_uses_tau_hard_within_the_target_modality_and_tau_norm_across():
    query, positive, _ = _pairs(batch=5)
    modality = [0, 1, 0, 2, 1]

    loss = MACLoss(tau_norm=0.05, tau_hard=0.02)(query, positive, torch.tensor(modality))["loss"]

    hand = _hand_contrastive(query.tolist(), positive.tolist(), modality, modality, 0.02, 0.05)
    assert_close(loss.item(), hand, dtype=torch.float64, ulps=HAND_ULPS)


def test_mac_groups_hard_negatives_by_their_own_modality():
    # Given 3 pairs with 2 hard negatives each, whose modalities differ from their query's target.
    query, positive, negatives = _pairs(batch=3, negatives=6, seed=1)
    modality, negative_modality = [0, 1, 1], [1, 0, 1, 1, 0, 0]

    out = MACLoss(tau_norm=0.05, tau_hard=0.02)(
        query, positive, torch.tensor(modality), negatives, torch.tensor(negative_modality)
    )

    candidates = positive.tolist() + negatives.tolist()
    hand = _hand_contrastive(query.tolist(), candidates, modality, modality + negative_modality, 0.02, 0.05)
    assert_close(out["loss"].item(), hand, dtype=torch.float64, ulps=HAND_ULPS)
    # And the diagnostics split the same way: intra = same modality as the query's target, positive excluded.
    intra, inter = [], []
    for i, q in enumerate(query.tolist()):
        for j, c in enumerate(candidates):
            if j != i:
                (intra if (modality + negative_modality)[j] == modality[i] else inter).append(_cos(q, c))
    assert_close(out["intra_neg_sim"].item(), sum(intra) / len(intra), dtype=torch.float64, ulps=HAND_ULPS)
    assert_close(out["inter_neg_sim"].item(), sum(inter) / len(inter), dtype=torch.float64, ulps=HAND_ULPS)


def test_mac_equals_infonce_when_tau_hard_equals_tau_norm_in_value_and_gradient():
    # Given the same embeddings fed to both losses.
    query, positive, negatives = (t.requires_grad_() for t in _pairs(batch=6, negatives=6, seed=2))
    modality, negative_modality = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 1, 0, 0, 1])

    # When MAC runs at tau_hard == tau_norm and InfoNCE at the same temperature.
    mac = MACLoss(tau_norm=0.03, tau_hard=0.03)(query, positive, modality, negatives, negative_modality)["loss"]
    mac_grads = torch.autograd.grad(mac, (query, positive, negatives))
    infonce = InfoNCELoss(temperature=0.03)(query, positive, negatives=negatives)["loss"]
    infonce_grads = torch.autograd.grad(infonce, (query, positive, negatives))

    # Then the values and the gradients are identical.
    torch.testing.assert_close(mac, infonce, rtol=0, atol=0)
    for mac_grad, infonce_grad in zip(mac_grads, infonce_grads):
        torch.testing.assert_close(mac_grad, infonce_grad, rtol=0, atol=0)


def test_mac_tau_hard_defaults_to_tau_norm_and_follows_the_schedule():
    loss_fn = MACLoss(tau_norm=0.03)
    assert loss_fn.tau_hard == 0.03

    loss_fn.tau_hard = tau_hard_schedule(1.0, 2.0, tau_norm=0.03)
    query, positive, _ = _pairs(batch=4, seed=3)
    modality = [0, 0, 1, 1]
    loss = loss_fn(query, positive, torch.tensor(modality))["loss"]

    assert loss_fn.tau_hard == 0.018
    hand = _hand_contrastive(query.tolist(), positive.tolist(), modality, modality, 0.018, 0.03)
    assert_close(loss.item(), hand, dtype=torch.float64, ulps=HAND_ULPS)
    with pytest.raises(ValueError, match="tau_hard must be .*got 0.0"):
        loss_fn.tau_hard = 0.0
    loss_fn.tau_hard = None
    assert loss_fn.tau_hard == 0.03


def test_mac_on_a_single_modality_batch_is_infonce_at_tau_hard():
    query, positive, _ = _pairs(batch=4, seed=4)

    out = MACLoss(tau_norm=0.05, tau_hard=0.02)(query, positive, torch.zeros(4, dtype=torch.long))

    expected = InfoNCELoss(temperature=0.02)(query, positive)["loss"]
    torch.testing.assert_close(out["loss"], expected)
    assert "intra_neg_sim" in out and "inter_neg_sim" not in out


def test_batch_of_one_has_zero_loss_finite_gradient_and_no_negative_diagnostics():
    query = torch.randn(1, 4, requires_grad=True)

    out = MACLoss()(query, torch.randn(1, 4), torch.tensor([2]))
    out["loss"].backward()

    assert out["loss"].item() == 0.0
    assert torch.isfinite(query.grad).all()
    assert set(out) == {"loss", "pos_sim", "accuracy", "num_candidates"} and out["num_candidates"].item() == 1
    assert out["accuracy"].item() == 1.0


def test_diagnostics_match_hand_computation_and_carry_no_gradient():
    query, positive = (t.requires_grad_() for t in _pairs(batch=4, seed=5)[:2])
    modality = [0, 1, 0, 1]

    out = MACLoss(tau_norm=0.05, tau_hard=0.02)(query, positive, torch.tensor(modality))

    cos = [[_cos(q, c) for c in positive.tolist()] for q in query.tolist()]
    intra = [cos[i][j] for i in range(4) for j in range(4) if j != i and modality[i] == modality[j]]
    inter = [cos[i][j] for i in range(4) for j in range(4) if modality[i] != modality[j]]
    correct = [max(range(4), key=lambda j: cos[i][j]) == i for i in range(4)]
    assert_close(out["pos_sim"].item(), sum(cos[i][i] for i in range(4)) / 4, dtype=torch.float64, ulps=HAND_ULPS)
    assert_close(out["intra_neg_sim"].item(), sum(intra) / len(intra), dtype=torch.float64, ulps=HAND_ULPS)
    assert_close(out["inter_neg_sim"].item(), sum(inter) / len(inter), dtype=torch.float64, ulps=HAND_ULPS)
    assert out["accuracy"].item() == pytest.approx(sum(correct) / 4)
    assert out["loss"].requires_grad
    assert not any(value.requires_grad for key, value in out.items() if key != "loss")


def test_label_offset_scores_a_slice_of_queries_against_all_candidates():
    # Given the queries of the second "rank" only, as under local_loss.
    query, positive, _ = _pairs(batch=6, seed=6)
    modality = [0, 1, 2, 0, 1, 2]

    out = MACLoss(0.05, 0.02).compute_loss_from_embeddings(
        query[3:], positive, torch.tensor(modality), label_offset=3
    )

    total = 0.0
    for i in range(3, 6):
        taus = [0.02 if modality[j] == modality[i] else 0.05 for j in range(6)]
        logits = [_cos(query[i].tolist(), c) / tau for c, tau in zip(positive.tolist(), taus)]
        total -= _log_softmax(logits)[i]
    assert_close(out["loss"].item(), total / 3, dtype=torch.float64, ulps=HAND_ULPS)


def test_contrastive_losses_normalise_their_inputs():
    query, positive, negatives = _pairs(batch=4, negatives=4, seed=7)
    scale = torch.tensor([[0.1], [3.0], [7.0], [0.5]], dtype=torch.float64)

    plain = InfoNCELoss()(query, positive, negatives=negatives)["loss"]
    scaled = InfoNCELoss()(query * scale, positive * scale.flip(0), negatives=negatives * 9)["loss"]

    torch.testing.assert_close(plain, scaled)


def test_low_precision_embeddings_are_scored_in_float32():
    query, positive, _ = _pairs(batch=4, seed=8)

    out = MACLoss()(query.bfloat16(), positive.bfloat16(), torch.tensor([0, 1, 0, 1]))

    expected = MACLoss()(query.bfloat16().float(), positive.bfloat16().float(), torch.tensor([0, 1, 0, 1]))
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], expected["loss"])


def test_mac_rejects_missing_or_misshapen_modality_ids():
    query, positive, negatives = _pairs(batch=3, negatives=3)
    with pytest.raises(ValueError, match="modality must be"):
        MACLoss()(query, positive, None)
    with pytest.raises(ValueError, match=r"modality shape must be .*got \(2,\)"):
        MACLoss()(query, positive, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="negative_modality shape must be .*got None"):
        MACLoss()(query, positive, torch.tensor([0, 1, 0]), negatives)


# ---------------------------------------------------------------- distillation


def test_hidden_state_mse_matches_hand_computation_on_unnormalised_vectors():
    query, positive, _ = _pairs(batch=3, seed=9)
    teacher_query, teacher_positive = query * 2 + 1, positive - 0.5

    loss = HiddenStateDistillLoss(metric="mse", weight=0.05)(query, positive, teacher_query, teacher_positive)

    def mse(a, b):
        squares = [(x - y) ** 2 for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)]
        return sum(squares) / len(squares)

    hand = 0.05 * (mse(query.tolist(), teacher_query.tolist()) + mse(positive.tolist(), teacher_positive.tolist()))
    assert_close(loss["loss"].item(), hand, dtype=torch.float64, ulps=HAND_ULPS)


def test_hidden_state_cosine_matches_hand_computation():
    query, positive, _ = _pairs(batch=3, seed=10)
    teacher_query, teacher_positive, _ = _pairs(batch=3, seed=11)

    loss = HiddenStateDistillLoss(metric="cosine", weight=0.5)(query, positive, teacher_query, teacher_positive)

    def mean_distance(a, b):
        return sum(1 - _cos(u, v) for u, v in zip(a, b)) / len(a)

    hand = 0.5 * (
        mean_distance(query.tolist(), teacher_query.tolist())
        + mean_distance(positive.tolist(), teacher_positive.tolist())
    )
    assert_close(loss["loss"].item(), hand, dtype=torch.float64, ulps=HAND_ULPS)


@pytest.mark.parametrize("metric", HiddenStateDistillLoss.METRICS)
def test_hidden_state_teacher_gets_no_gradient(metric):
    student = [t.requires_grad_() for t in _pairs(batch=3, seed=12)[:2]]
    teacher = [t.requires_grad_() for t in _pairs(batch=3, seed=13)[:2]]

    HiddenStateDistillLoss(metric=metric)(*student, *teacher)["loss"].backward()

    assert all(t.grad is not None for t in student)
    assert all(t.grad is None for t in teacher)


def test_kl_matches_hand_computation_with_hard_negatives_and_teacher_temperature():
    query, positive, negatives = (t.requires_grad_() for t in _pairs(batch=3, negatives=3, seed=14))
    teacher_query, teacher_positive, teacher_negatives = (t.requires_grad_() for t in _pairs(3, 4, 3, seed=15))

    out = KLDistillLoss(temperature=0.05, teacher_temperature=0.1)(
        query, positive, teacher_query, teacher_positive, negatives, teacher_negatives
    )
    out["loss"].backward()

    candidates = positive.tolist() + negatives.tolist()
    teacher_candidates = teacher_positive.tolist() + teacher_negatives.tolist()
    total = 0.0
    for q, t in zip(query.tolist(), teacher_query.tolist()):
        log_p_student = _log_softmax([_cos(q, c) / 0.05 for c in candidates])
        log_p_teacher = _log_softmax([_cos(t, c) / 0.1 for c in teacher_candidates])
        total += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_p_teacher, log_p_student))
    assert_close(out["loss"].item(), total / 3, dtype=torch.float64, ulps=HAND_ULPS)
    assert query.grad is not None and teacher_query.grad is None and teacher_positive.grad is None


def test_kl_is_zero_when_teacher_equals_student():
    query, positive, negatives = _pairs(batch=4, negatives=4, seed=16)

    loss = KLDistillLoss()(query, positive, query * 2, positive, negatives, negatives)["loss"]

    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_kl_requires_teacher_negatives_exactly_with_negatives():
    query, positive, negatives = _pairs(batch=2, negatives=2)
    with pytest.raises(ValueError, match="teacher_negatives must be given exactly with negatives"):
        KLDistillLoss()(query, positive, query, positive, negatives)


def test_objective_release_stage1_is_point9_infonce_plus_point1_of_the_weighted_mse():
    query, positive, _ = _pairs(batch=4, seed=17)
    teacher_query, teacher_positive, _ = _pairs(batch=4, seed=18)
    objective = DistillationObjective(
        InfoNCELoss(temperature=0.05), hidden_state=HiddenStateDistillLoss("mse", 0.05), kl=KLDistillLoss(0.05)
    )

    out = objective(query, positive, teacher_query, teacher_positive)

    infonce = InfoNCELoss(0.05)(query, positive)["loss"]
    mse = ((query - teacher_query) ** 2).mean() + ((positive - teacher_positive) ** 2).mean()
    torch.testing.assert_close(out["loss"], 0.9 * infonce + 0.1 * 0.05 * mse)
    torch.testing.assert_close(out["contrastive_loss"], infonce)
    torch.testing.assert_close(out["distill_loss"], 0.05 * mse)
    assert "kl_loss" in out and {"pos_sim", "intra_neg_sim", "accuracy"} <= set(out)  # kl given at weight 0
    assert not any(out[key].requires_grad for key in ("contrastive_loss", "distill_loss", "kl_loss"))


def test_objective_adds_kl_with_its_weight():
    query, positive, _ = _pairs(batch=4, seed=19)
    teacher_query, teacher_positive, _ = _pairs(batch=4, seed=20)
    objective = DistillationObjective(
        MACLoss(0.03, 0.02), kl=KLDistillLoss(0.05), contrastive_weight=1.0, distill_weight=0.0, kl_weight=0.3
    )

    out = objective(query, positive, teacher_query, teacher_positive, modality=torch.tensor([0, 1, 0, 1]))

    mac = MACLoss(0.03, 0.02)(query, positive, torch.tensor([0, 1, 0, 1]))["loss"]
    kl = KLDistillLoss(0.05)(query, positive, teacher_query, teacher_positive)["loss"]
    torch.testing.assert_close(out["loss"], mac + 0.3 * kl)
    assert "distill_loss" not in out


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"distill_weight": 0.1}, "distill_weight"),
        ({"kl_weight": 0.2}, "kl_weight"),
        ({"contrastive_weight": -1}, "contrastive_weight"),
    ],
)
def test_objective_rejects_a_weight_without_its_loss_or_below_zero(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name} must be .*got {kwargs[name]}"):
        DistillationObjective(InfoNCELoss(), **{"distill_weight": 0.0, **kwargs})


# ---------------------------------------------------------------- elastic depths and Matryoshka sizes


def _by_depth(depths=(1, 2, 3), batch=5, dim=8, negatives=0, seed=30):
    """Seeded float64 `(query, positive, negatives or None)`, each `{depth: (rows, dim)}` requiring gradient."""
    generator = torch.Generator().manual_seed(seed)

    def draw(rows):
        return {d: torch.randn(rows, dim, generator=generator, dtype=torch.float64).requires_grad_() for d in depths}

    return draw(batch), draw(batch), draw(negatives) if negatives else None


@pytest.mark.parametrize("name", ["mac", "infonce"])
def test_elastic_grid_is_the_weighted_sum_of_the_contrastive_loss_at_every_depth_and_size(name):
    # Given 3 depths, 3 sizes and 2 hard negatives per pair, with weights per depth and per size
    query, positive, negatives = _by_depth(negatives=10)
    modality, negative_modality = [0, 1, 0, 2, 1], [1, 0, 0, 2, 2, 1, 0, 1, 1, 2]
    contrastive = MACLoss(tau_norm=0.05, tau_hard=0.02) if name == "mac" else InfoNCELoss(temperature=0.05)
    taus = (0.02, 0.05) if name == "mac" else (0.05, 0.05)
    depth_weights, dim_weights = {1: 0.2, 2: 0.3, 3: 1.0}, {2: 0.5, 4: 1.0, 8: 2.0}
    objective = ElasticObjective(DistillationObjective(contrastive, contrastive_weight=0.7, distill_weight=0.0),
                                 depths=[1, 2, 3], matryoshka_dims=[2, 4, 8], depth_weights=list(depth_weights.values()),
                                 matryoshka_weights=list(dim_weights.values()))

    out = objective(query, positive, modality=torch.tensor(modality), negatives=negatives,
                    negative_modality=torch.tensor(negative_modality))

    # Then every pair's loss is the hand-computed loss of the first m coordinates, and the total their weighted sum
    total = 0.0
    for depth, alpha in depth_weights.items():
        candidates = positive[depth].tolist() + negatives[depth].tolist()
        for dim, beta in dim_weights.items():
            hand = _hand_contrastive([q[:dim] for q in query[depth].tolist()], [c[:dim] for c in candidates], modality,
                                     modality + negative_modality, *taus)
            assert_close(out[f"contrastive_loss_d{depth}_m{dim}"].item(), hand, dtype=torch.float64, ulps=HAND_ULPS)
            total += alpha * beta * hand
    assert_close(out["contrastive_loss"].item(), total, dtype=torch.float64, ulps=HAND_ULPS)
    assert_close(out["loss"].item(), 0.7 * total, dtype=torch.float64, ulps=HAND_ULPS)
    assert len([key for key in out if key.startswith("contrastive_loss_")]) == 9
    # and the diagnostics are the deepest pair's, here the full depth and size
    full = contrastive(query[3], positive[3], torch.tensor(modality), negatives[3], torch.tensor(negative_modality))
    for key in ("pos_sim", "intra_neg_sim", "accuracy"):
        torch.testing.assert_close(out[key], full[key], rtol=0, atol=0)


def test_elastic_diagonal_trains_the_ith_depth_at_the_ith_size_only():
    query, positive, _ = _by_depth()
    objective = ElasticObjective(DistillationObjective(InfoNCELoss(0.05), contrastive_weight=1.0, distill_weight=0.0),
                                 depths=[1, 2, 3], matryoshka_dims=[2, 4, 8], depth_weights=[1.0, 2.0, 3.0],
                                 pairs="diagonal")

    out = objective(query, positive)

    assert sorted(key for key in out if key.startswith("contrastive_loss_")) == [
        "contrastive_loss_d1_m2", "contrastive_loss_d2_m4", "contrastive_loss_d3_m8"]
    expected = sum(weight * InfoNCELoss(0.05)(query[depth][:, :dim], positive[depth][:, :dim])["loss"]
                   for depth, dim, weight in ((1, 2, 1.0), (2, 4, 2.0), (3, 8, 3.0)))
    torch.testing.assert_close(out["loss"], expected, rtol=1e-12, atol=0)


def test_elastic_sampled_schedule_trains_the_deepest_pair_plus_the_drawn_others_at_their_weights():
    # Given 3 depths at weights 0.5, 0.25, 1 and one other pair drawn per call besides the full depth
    query, positive, _ = _by_depth()
    modality = [0, 1, 0, 2, 1]
    weights = {1: 0.5, 2: 0.25, 3: 1.0}
    objective = ElasticObjective(DistillationObjective(MACLoss(tau_norm=0.05, tau_hard=0.02), contrastive_weight=0.7,
                                                       distill_weight=0.0),
                                 depths=[1, 2, 3], depth_weights=list(weights.values()), sample_pairs=1, seed=7)
    # the draws, by hand: a generator seeded alike, one permutation of the 2 shallower depths per call
    generator = torch.Generator().manual_seed(7)
    seen = set()

    for _ in range(6):
        out = objective(query, positive, modality=torch.tensor(modality))

        # Then each call's loss is the hand-computed loss at the drawn depth and at the full depth, weighted
        drawn = [1, 2][torch.randperm(2, generator=generator)[0].item()]
        seen.add(drawn)
        hand = {depth: _hand_contrastive(query[depth].tolist(), positive[depth].tolist(), modality, modality,
                                         0.02, 0.05) for depth in (drawn, 3)}
        assert sorted(key for key in out if key.startswith("contrastive_loss_")) == [f"contrastive_loss_d{drawn}",
                                                                                     "contrastive_loss_d3"]
        total = weights[drawn] * hand[drawn] + weights[3] * hand[3]
        assert_close(out["loss"].item(), 0.7 * total, dtype=torch.float64, ulps=HAND_ULPS)
    # and the draws vary from call to call
    assert seen == {1, 2}


@pytest.mark.parametrize("sample_pairs", [0, 3, 1.5])
def test_elastic_sampled_schedule_rejects_a_count_outside_the_other_pairs(sample_pairs):
    with pytest.raises(ValueError, match="sample_pairs"):
        ElasticObjective(DistillationObjective(InfoNCELoss(0.05), contrastive_weight=1.0, distill_weight=0.0),
                         depths=[1, 2, 3], sample_pairs=sample_pairs)


def test_elastic_with_one_depth_and_the_full_size_is_exactly_the_wrapped_objective():
    query, positive, negatives = _by_depth(depths=(3,), negatives=5)
    teacher_query, teacher_positive, teacher_negatives = (t[3].detach() for t in _by_depth((3,), negatives=5, seed=31))
    modality, negative_modality = torch.tensor([0, 1, 0, 2, 1]), torch.tensor([1, 1, 0, 2, 0])
    objective = DistillationObjective(MACLoss(0.03, 0.02), HiddenStateDistillLoss("mse", 0.05), KLDistillLoss(0.05),
                                      contrastive_weight=0.9, distill_weight=0.1, kl_weight=0.3)
    arguments = (teacher_query, teacher_positive, modality)

    plain = objective(query[3], positive[3], *arguments, negatives[3], negative_modality, teacher_negatives)
    plain_grads = torch.autograd.grad(plain["loss"], (query[3], positive[3], negatives[3]))
    elastic = ElasticObjective(objective, depths=[3])(query, positive, *arguments, negatives, negative_modality,
                                                      teacher_negatives)
    elastic_grads = torch.autograd.grad(elastic["loss"], (query[3], positive[3], negatives[3]))

    for key, value in plain.items():
        torch.testing.assert_close(elastic[key], value, rtol=0, atol=0)
    for got, expected in zip(elastic_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert set(elastic) - set(plain) == {"contrastive_loss_d3", "accuracy_d3"}


def test_the_teacher_distils_the_deepest_depth_and_self_distillation_pulls_the_others_towards_it():
    # Given no contrastive term, an MSE teacher term and cosine self-distillation
    query, positive, _ = _by_depth()
    teacher_query, teacher_positive = (t[3].detach() for t in _by_depth(seed=32)[:2])
    objective = ElasticObjective(
        DistillationObjective(InfoNCELoss(0.05), HiddenStateDistillLoss("mse", 1.0), contrastive_weight=0.0,
                              distill_weight=0.5),
        depths=[1, 2, 3], self_distill=HiddenStateDistillLoss("cosine", 1.0), self_distill_weight=0.25)

    out = objective(query, positive, teacher_query, teacher_positive)

    # Then the teacher term is the deepest depth's MSE and each shallower depth's cosine distance is to depth 3
    mse = F.mse_loss(query[3], teacher_query) + F.mse_loss(positive[3], teacher_positive)

    def distance(student, target):
        return sum(1 - _cos(u, v) for u, v in zip(student.tolist(), target.tolist())) / len(student)

    self_terms = {d: distance(query[d], query[3]) + distance(positive[d], positive[3]) for d in (1, 2)}
    assert_close(out["distill_loss"].item(), mse.item(), dtype=torch.float64, ulps=HAND_ULPS)
    assert_close(out["self_distill_loss_d1"].item(), self_terms[1], dtype=torch.float64, ulps=HAND_ULPS)
    assert_close(out["loss"].item(), 0.5 * mse.item() + 0.25 * sum(self_terms.values()), dtype=torch.float64,
                 ulps=HAND_ULPS)
    # and the deepest depth, the target, gets the teacher term's gradient alone
    got = torch.autograd.grad(out["loss"], query[3])[0]
    expected = torch.autograd.grad(0.5 * F.mse_loss(query[3], teacher_query), query[3])[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_self_kl_distils_every_other_pair_towards_the_deepest_depth_at_full_size():
    query, positive, _ = _by_depth()
    objective = ElasticObjective(
        DistillationObjective(InfoNCELoss(0.05), contrastive_weight=0.0, distill_weight=0.0),
        depths=[1, 2, 3], matryoshka_dims=[4, 8], self_kl=KLDistillLoss(0.05), self_kl_weight=2.0)

    out = objective(query, positive)

    pairs = [(1, 4), (1, 8), (2, 4), (2, 8), (3, 4)]  # not (3, 8): the deepest depth at full size is the target
    assert {key for key in out if key.startswith("self_kl_loss")} == {f"self_kl_loss_d{d}_m{m}" for d, m in pairs}
    target = (query[3].detach(), positive[3].detach())
    expected = sum(KLDistillLoss(0.05)(query[d][:, :m], positive[d][:, :m], *target)["loss"] for d, m in pairs)
    torch.testing.assert_close(out["loss"], 2.0 * expected, rtol=1e-12, atol=0)
    # the target is detached: the deepest depth's last coordinates, beyond every smaller size, get no gradient
    assert torch.all(torch.autograd.grad(out["loss"], query[3])[0][:, 4:] == 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depths": [2, 1]}, r"depths must be strictly increasing, got \[2, 1\]"),
        ({"depths": []}, r"depths must be a non-empty list, got \[\]"),
        ({"depths": [0, 3]}, "depths must be positive integers"),
        ({"depth_weights": [1.0]}, r"depth_weights must be a list of 3 weights, one per entry of depths, got \[1.0\]"),
        ({"matryoshka_dims": [4, 8], "matryoshka_weights": [1.0, -1.0]}, "matryoshka_weights must be finite and >= 0"),
        ({"matryoshka_weights": [1.0]}, "matryoshka_weights must be None without matryoshka_dims"),
        ({"pairs": "random"}, "pairs must be one of .*got 'random'"),
        ({"matryoshka_dims": [4, 8], "pairs": "diagonal"}, r"one size per depth \(3\) with pairs='diagonal'"),
        ({"depths": [3], "self_distill": HiddenStateDistillLoss()}, "self_distill must be None with a single depth"),
        ({"self_kl_weight": 0.5}, "self_kl_weight must be 0 when its loss is not given"),
        ({"self_kl": KLDistillLoss(gather_across_devices=True)}, "self_kl gather settings must be those of"),
        ({"depths": [3], "self_kl": KLDistillLoss()}, "self_kl must be None when the only pair is the deepest"),
    ],
)
def test_elastic_objective_rejects_bad_settings_naming_them(kwargs, match):
    arguments = {"depths": [1, 2, 3], **kwargs}
    with pytest.raises(ValueError, match=match):
        ElasticObjective(DistillationObjective(InfoNCELoss(), distill_weight=0.0), **arguments)


def test_elastic_objective_rejects_missing_depths_and_oversized_dims_at_call_time():
    query, positive, _ = _by_depth(depths=(1, 3))
    objective = ElasticObjective(DistillationObjective(InfoNCELoss(), distill_weight=0.0), depths=[1, 2, 3])
    with pytest.raises(ValueError, match=r"query depths must be a dict holding the embeddings at every depth of "
                                         r"\[1, 2, 3\], got \[1, 3\]"):
        objective(query, positive)
    query, positive, _ = _by_depth()
    too_wide = ElasticObjective(DistillationObjective(InfoNCELoss(), distill_weight=0.0), depths=[3],
                                matryoshka_dims=[16])
    with pytest.raises(ValueError, match="matryoshka_dims entry must be <= the embedding size 8, got 16"):
        too_wide(query, positive)


def test_elastic_objective_config_and_citations():
    objective = ElasticObjective(DistillationObjective(MACLoss(0.03), distill_weight=0.0), depths=[1, 2],
                                 matryoshka_dims=[4, 8], pairs="diagonal", self_kl=KLDistillLoss(0.03),
                                 self_kl_weight=0.5)

    config = objective.get_config_dict()

    assert config["depths"] == [1, 2] and config["depth_weights"] == [1.0, 1.0] and config["pairs"] == "diagonal"
    assert config["matryoshka_dims"] == [4, 8] and config["matryoshka_weights"] == [1.0, 1.0]
    assert config["objective"]["contrastive"]["loss"] == "MACLoss" and config["self_kl"]["loss"] == "KLDistillLoss"
    assert config["self_distill"] is None and config["self_kl_weight"] == 0.5
    assert all(arxiv in objective.citation for arxiv in ("2507.08064", "2410.13230", "2402.14776"))


# ---------------------------------------------------------------- construction, config, citation


def test_build_loss_builds_the_named_loss_and_rejects_an_unknown_name():
    assert isinstance(build_loss("infonce", temperature=0.05), InfoNCELoss)
    mac = build_loss("mac", tau_norm=0.03, tau_hard=0.02)
    assert isinstance(mac, MACLoss) and mac.tau_hard == 0.02

    with pytest.raises(ValueError, match="loss name must be one of .*got 'triplet'"):
        build_loss("triplet")


@pytest.mark.parametrize(
    ("loss_class", "kwargs", "name"),
    [
        (InfoNCELoss, {"temperature": 0.0}, "temperature"),
        (MACLoss, {"tau_norm": -0.03}, "tau_norm"),
        (MACLoss, {"tau_hard": -1.0}, "tau_hard"),
        (HiddenStateDistillLoss, {"metric": "l1"}, "metric"),
        (HiddenStateDistillLoss, {"weight": -0.05}, "weight"),
        (KLDistillLoss, {"temperature": 0.0}, "temperature"),
        (KLDistillLoss, {"teacher_temperature": -0.1}, "teacher_temperature"),
        (InfoNCELoss, {"local_loss": True, "gather_with_grad": False}, "gather_with_grad"),
    ],
)
def test_constructors_reject_a_bad_argument_naming_the_value(loss_class, kwargs, name):
    with pytest.raises(ValueError, match=rf"{name} must be .*got '?{kwargs[name]}'?"):
        loss_class(**kwargs)


def test_every_loss_has_a_config_dict_and_the_puma_citation():
    losses = [
        InfoNCELoss(0.05, gather_with_grad=False),
        MACLoss(0.03, 0.02, gather_across_devices=True, local_loss=True),
        HiddenStateDistillLoss("cosine", 0.1),
        KLDistillLoss(0.05, 0.1),
        DistillationObjective(InfoNCELoss(), hidden_state=HiddenStateDistillLoss()),
    ]

    configs = [loss.get_config_dict() for loss in losses]

    assert configs[0] == {"temperature": 0.05, "gather_across_devices": False, "local_loss": False,
                          "gather_with_grad": False}
    assert configs[1] == {"tau_norm": 0.03, "tau_hard": 0.02, "gather_across_devices": True, "local_loss": True,
                          "gather_with_grad": True}
    assert configs[2] == {"metric": "cosine", "weight": 0.1}
    assert configs[3]["teacher_temperature"] == 0.1
    assert configs[4]["contrastive"]["loss"] == "InfoNCELoss" and configs[4]["kl"] is None
    assert configs[4]["distill_weight"] == 0.1
    for loss in losses:
        assert "2507.08064" in loss.citation and "Modality-Adaptive Learning" in loss.citation


def test_gather_features_returns_inputs_unchanged_without_a_process_group():
    tensors = (torch.randn(2, 3), torch.tensor([0, 1]), None)

    assert gather_features(*tensors) == tensors


def test_docstring_examples_run():
    result = doctest.testmod(losses_puma)

    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- two gloo processes against one process

WORLD_SIZE = 2
# "_global": every rank scores the global batch; "_local": only its own queries; "hidden_state": no gather;
# "plain_gather": the release's gather without gradient (gather_with_grad=False), whose averaged gradient is 1/W of
# the global one.
SCENARIOS = (
    "infonce_global",
    "mac_global",
    "mac_local",
    "kl_global",
    "kl_local",
    "hidden_state",
    "objective_global",
    "plain_gather",
    "elastic_global",
    "elastic_local",
)


def _toy_encoders_and_batch():
    """A shared linear student "encoder", a frozen teacher, and 8 pairs with 2 hard negatives each."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 5), nn.Linear(6, 5).requires_grad_(False)
    batch = {
        "query": torch.randn(8, 6),
        "positive": torch.randn(8, 6),
        "negatives": torch.randn(16, 6),
        "modality": torch.tensor([0, 1, 0, 2, 1, 1, 0, 2]),
        "negative_modality": torch.tensor([1, 0, 0, 0, 2, 1, 1, 1, 0, 2, 2, 2, 1, 0, 0, 1]),
    }
    return student, teacher, batch


def _scenario_loss(name, student, teacher, batch):
    """The loss of `name` on `batch` (a rank's shard, or the whole batch in one process)."""
    q, c, n = (student(batch[key]) for key in ("query", "positive", "negatives"))
    tq, tc, tn = (teacher(batch[key]) for key in ("query", "positive", "negatives"))
    m, nm = batch["modality"], batch["negative_modality"]
    local = name.endswith("_local")
    mac = MACLoss(tau_norm=0.05, tau_hard=0.02, gather_across_devices=True, local_loss=local)
    kl = KLDistillLoss(0.05, 0.1, gather_across_devices=True, local_loss=local)
    if name == "infonce_global":
        return InfoNCELoss(0.05, gather_across_devices=True)(q, c, negatives=n)["loss"]
    if name.startswith("mac"):
        return mac(q, c, m, n, nm)["loss"]
    if name.startswith("kl"):
        return kl(q, c, tq, tc, n, tn)["loss"]
    if name == "hidden_state":
        return HiddenStateDistillLoss("mse", 0.05)(q, c, tq, tc)["loss"]
    if name == "objective_global":
        objective = DistillationObjective(mac, HiddenStateDistillLoss(), kl, 0.9, 0.1, 0.5)
        return objective(q, c, tq, tc, m, n, nm, tn)["loss"]
    if name.startswith("elastic"):  # "depth 2" is a further function of "depth 1"; sizes 3 and all 5
        objective = ElasticObjective(
            DistillationObjective(mac, HiddenStateDistillLoss(), kl, 0.9, 0.1, 0.5), depths=[1, 2],
            matryoshka_dims=[3, 5], depth_weights=[0.5, 1.0], self_distill=HiddenStateDistillLoss("cosine", 1.0),
            self_kl=KLDistillLoss(0.05, gather_across_devices=True, local_loss=local), self_distill_weight=0.2,
            self_kl_weight=0.3)

        def depths(x):
            return {1: x, 2: x + torch.tanh(x)}

        return objective(depths(q), depths(c), tq, tc, m, depths(n), nm, tn)["loss"]
    return MACLoss(0.05, 0.02, gather_across_devices=True, gather_with_grad=False)(q, c, m, n, nm)["loss"]


def _shard(batch, rank, world_size):
    # Hard negatives are query-major, so the rank-major chunks of every entry belong together.
    return {key: value.chunk(world_size)[rank] for key, value in batch.items()}


def _distributed_worker(rank, world_size, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        student, teacher, batch = _toy_encoders_and_batch()
        shard = _shard(batch, rank, world_size)
        results = {}
        for name in SCENARIOS:
            student.zero_grad()
            loss = _scenario_loss(name, student, teacher, shard)
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in student.parameters()])
            dist.all_reduce(grad)  # DDP averages the ranks' gradients
            losses = [torch.zeros(()) for _ in range(world_size)]
            dist.all_gather(losses, loss.detach())
            results[name] = {"grad": grad / world_size, "losses": torch.stack(losses)}
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    mp.spawn(
        _distributed_worker,
        args=(WORLD_SIZE, str(folder / "rendezvous"), str(folder / "results.pt")),
        nprocs=WORLD_SIZE,
    )
    return torch.load(folder / "results.pt")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gathered_loss_equals_single_process_loss_and_gradient(two_process_results, scenario):
    # Given one process holding the whole batch (gather_features is then the identity).
    student, teacher, batch = _toy_encoders_and_batch()
    loss = _scenario_loss(scenario, student, teacher, batch)
    loss.backward()
    expected_grad = torch.cat([p.grad.flatten() for p in student.parameters()])

    # When two ranks each hold half of it and average their gradients as DDP does.
    result = two_process_results[scenario]

    # Then the gradients agree (scaled by W for the plain gather) and the ranks' losses average to the loss.
    scale = WORLD_SIZE if scenario == "plain_gather" else 1
    # float32 sums over the whole batch vs over each half then averaged across ranks: rounding in another order
    assert_close(result["grad"] * scale, expected_grad, ulps=GATHER_ULPS, name="gradient")
    assert_close(result["losses"].mean(), loss.detach(), ulps=GATHER_ULPS, name="mean loss")
    if scenario in ("infonce_global", "mac_global", "kl_global", "plain_gather"):
        assert_close(result["losses"], loss.detach().expand(WORLD_SIZE), ulps=GATHER_ULPS, name="rank losses")
