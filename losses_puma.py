# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA training losses: InfoNCE, the modality-adaptive contrastive loss (MAC), hidden-state and KL distillation,
their weighted sum, the modifier that trains it at several depths and Matryoshka sizes at once, the hard-temperature
schedule, and the cross-device gather they share.

Every loss takes embeddings and returns a dict whose `"loss"` entry is the tensor to backpropagate; the other
entries are detached, for logging. The arithmetic lives in `compute_loss_from_embeddings`, which works on plain
tensors in one process; `forward` only gathers across devices first. Losses compute in float32 at least,
whatever the embedding dtype. Reference: PUMA, arXiv 2507.08064.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


CITATION = """@inproceedings{lyu2025puma,
    title = {{PUMA}: Layer-Pruned Language Model for Efficient Unified Multimodal Retrieval
             with Modality-Adaptive Learning},
    author = {Lyu, Yibo and Shao, Rui and Chen, Gongwei and Zhu, Yijie and Guan, Weili and Nie, Liqiang},
    booktitle = {Proceedings of the 33rd ACM International Conference on Multimedia},
    year = {2025},
    eprint = {2507.08064},
    archivePrefix = {arXiv},
}"""


def _require(condition: bool, name: str, value: object, expectation: str) -> None:
    if not condition:
        raise ValueError(f"{name} must be {expectation}, got {value!r}")


def tau_hard_schedule(
    progress_epochs: float,
    total_epochs: float,
    tau_norm: float = 0.03,
    decay: float = 0.5,
    plateau: float = 0.5,
    round_digits: int | None = 3,
) -> float:
    r"""Intra-modality temperature of [`MACLoss`] after `progress_epochs` of `total_epochs`.

    .. math::
        \tau_{hard}(e) = \operatorname{round}\big(\tau_{norm} \exp(-d \cdot \min(p, e/E) / p),\ 3\big)

    It starts at `tau_norm`, decays exponentially until the fraction `plateau` of training, then stays at
    `tau_norm * exp(-decay)`. With the release's `plateau=0.5` this is
    `round(tau_norm * exp(-decay * min(0.5, e/E) * 2), 3)`.

    Args:
        progress_epochs: e, the training done so far, >= 0: epochs (fractional), as the release counts, or optimizer
            steps for a run whose length is set in steps (`PumaTrainer` passes `global_step` when `max_steps > 0`).
        total_epochs: E, > 0, in the unit of `progress_epochs`.
        tau_norm: Starting (and inter-modality) temperature, > 0.
        decay: d, >= 0; the final temperature is `tau_norm * exp(-decay)`.
        plateau: p in (0, 1], fraction of training after which the temperature stays constant.
        round_digits: Decimal digits kept; `None` keeps the exact value.

    Example:
        >>> tau_hard_schedule(0.5, 2.0)  # e/E = 0.25: round(0.03 * exp(-0.25), 3)
        0.023
        >>> round(tau_hard_schedule(3.0, 4.0, round_digits=None), 6)  # past the plateau: 0.03 * exp(-0.5)
        0.018196
    """
    _require(progress_epochs >= 0, "progress_epochs", progress_epochs, ">= 0")
    _require(total_epochs > 0, "total_epochs", total_epochs, "> 0")
    _require(tau_norm > 0, "tau_norm", tau_norm, "> 0")
    _require(decay >= 0, "decay", decay, ">= 0")
    _require(0 < plateau <= 1, "plateau", plateau, "in (0, 1]")
    _require(round_digits is None or round_digits >= 0, "round_digits", round_digits, "None or >= 0")
    tau = tau_norm * math.exp(-decay * min(plateau, progress_epochs / total_epochs) / plateau)
    return tau if round_digits is None else round(tau, round_digits)


def gather_features(*tensors: Tensor | None, with_grad: bool = True) -> tuple[Tensor | None, ...]:
    """Concatenate each tensor's rows from every rank, in rank order (the open_clip `gather_features` pattern).

    Without an initialised process group, or with one rank, the inputs come back unchanged. `None` entries stay
    `None`; tensors that need no gradient (modality ids, teacher embeddings) use a plain `all_gather`. Every rank
    must pass the same entries with the same shapes.

    Args:
        tensors: Tensors of shape `(rows, ...)`.
        with_grad: Gather with `torch.distributed.nn.functional.all_gather`, whose backward sums each shard's
            gradient over ranks.
            `False` uses a plain `all_gather` and puts the local shard back so that it keeps its gradient.

    Gradient rule, with W ranks whose parameter gradients are averaged as DDP does (each case is checked against
    one process holding the global batch in `tests/test_losses.py`):

    - `with_grad=True`, every rank computes the loss over all gathered rows: each rank's loss is the global loss,
      the backward sums the W identical gradients of each shard, DDP divides by W: the single-process gradient.
    - `with_grad=True`, each rank scores only its own queries (`local_loss=True`) against all gathered candidates
      and averages over them: the W local losses average to the global loss, and the same sum-then-average gives
      the single-process gradient.
    - `with_grad=False`, every rank computes the global loss: only the local shard carries gradient, so the
      averaged gradient is the single-process gradient divided by W.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    import torch.distributed.nn.functional as dist_nn  # only where torch has distributed support

    gathered = []
    for tensor in tensors:
        if tensor is None:
            gathered.append(None)
        elif with_grad and tensor.requires_grad:
            # torch's autograd all-gather: its backward sums each shard's gradient over ranks (a reduce-scatter)
            gathered.append(torch.cat(dist_nn.all_gather(tensor.contiguous())))
        else:
            shards = [torch.empty_like(tensor.contiguous()) for _ in range(dist.get_world_size())]
            dist.all_gather(shards, tensor.contiguous())
            shards[dist.get_rank()] = tensor  # the copy received from all_gather has no gradient
            gathered.append(torch.cat(shards))
    return tuple(gathered)


def at_least_fp32(tensor: Tensor) -> Tensor:
    """`tensor` in float32, or kept in its own dtype when that is wider (float64 stays float64)."""
    # At tau = 0.03 the bf16 rounding of s / tau is as large as the gaps between logits.
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _cosine_scores(query: Tensor, positive: Tensor, negatives: Tensor | None) -> Tensor:
    candidates = positive if negatives is None else torch.cat([positive, negatives])  # (p + n, d)
    query, candidates = at_least_fp32(query), at_least_fp32(candidates)
    return F.normalize(query, dim=-1) @ F.normalize(candidates, dim=-1).T  # (q, p + n)


@torch.no_grad()
def _diagnostics(scores: Tensor, labels: Tensor, same: Tensor) -> dict[str, Tensor]:
    rows = torch.arange(scores.shape[0], device=scores.device)
    negative = torch.ones_like(same)
    negative[rows, labels] = False
    out = {"pos_sim": scores[rows, labels].mean()}
    for key, mask in (("intra_neg_sim", same & negative), ("inter_neg_sim", ~same & negative)):
        if mask.any():  # an empty group has no mean: its key is left out rather than set to NaN
            out[key] = scores[mask].mean()
    out["accuracy"] = (scores.argmax(dim=1) == labels).float().mean()
    out["num_candidates"] = torch.tensor(float(scores.shape[1]), device=scores.device)  # after any gather
    return out


class _PumaLoss(nn.Module):
    @property
    def citation(self) -> str:
        return CITATION


class _GatheredLoss(_PumaLoss):
    """A loss scoring queries against candidates, optionally over the global batch of every rank."""

    def __init__(self, gather_across_devices: bool, local_loss: bool, gather_with_grad: bool = True) -> None:
        super().__init__()
        # Scoring local queries against gathered candidates needs the other ranks' gradients of the local candidates.
        _require(gather_with_grad or not local_loss, "gather_with_grad", gather_with_grad, "True with local_loss")
        self.gather_across_devices = gather_across_devices
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def _gather(self, queries: tuple, candidates: tuple) -> tuple[tuple, tuple, int]:
        """`(queries, candidates, label_offset)` for the global batch; see `gather_features` for the gradients."""
        if not self.gather_across_devices:
            return queries, candidates, 0
        candidates = gather_features(*candidates, with_grad=self.gather_with_grad)
        if self.local_loss:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            return queries, candidates, rank * queries[0].shape[0]
        return gather_features(*queries, with_grad=self.gather_with_grad), candidates, 0

    def _gather_config(self) -> dict[str, bool]:
        return {"gather_across_devices": self.gather_across_devices, "local_loss": self.local_loss,
                "gather_with_grad": self.gather_with_grad}


class _ContrastiveLoss(_GatheredLoss):
    """Cross-entropy of each query over all candidates, at `tau_intra` for those of its target modality."""

    modality_required = False

    def _temperatures(self) -> tuple[float, float]:  # (tau_intra, tau_inter)
        raise NotImplementedError

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        modality: Tensor | None = None,
        negatives: Tensor | None = None,
        negative_modality: Tensor | None = None,
    ) -> dict[str, Tensor]:
        (query,), candidates, offset = self._gather((query,), (positive, modality, negatives, negative_modality))
        return self.compute_loss_from_embeddings(query, *candidates, label_offset=offset)

    def compute_loss_from_embeddings(
        self,
        query: Tensor,
        positive: Tensor,
        modality: Tensor | None = None,
        negatives: Tensor | None = None,
        negative_modality: Tensor | None = None,
        label_offset: int = 0,
    ) -> dict[str, Tensor]:
        """The loss of `query` `(q, d)`, whose positives are rows `label_offset + i` of `positive` `(p, d)`."""
        name = type(self).__name__
        _require(modality is not None or not self.modality_required, "modality", modality, f"ids for {name}")
        rows = len(query) + label_offset
        _require(rows <= len(positive), "query rows + label_offset", rows, f"<= {len(positive)} positive rows")
        if modality is not None:
            _require(modality.shape == positive.shape[:1], "modality shape", tuple(modality.shape), "(positive rows,)")
            if negatives is not None:
                shape = None if negative_modality is None else tuple(negative_modality.shape)
                _require(shape == tuple(negatives.shape[:1]), "negative_modality shape", shape, "(negative rows,)")
        scores = _cosine_scores(query, positive, negatives)  # (q, p + n)
        labels = torch.arange(len(query), device=scores.device) + label_offset  # (q,)
        if modality is None:  # one modality: every candidate is intra-modality
            same = torch.ones_like(scores, dtype=torch.bool)  # (q, p + n)
        else:
            candidate_modality = modality if negatives is None else torch.cat([modality, negative_modality])
            same = modality[labels][:, None] == candidate_modality[None, :]  # (q, p + n)
        tau_intra, tau_inter = self._temperatures()
        logits = torch.where(same, scores / tau_intra, scores / tau_inter)  # (q, p + n)
        return {"loss": F.cross_entropy(logits, labels), **_diagnostics(scores, labels, same)}


class InfoNCELoss(_ContrastiveLoss):
    r"""InfoNCE over in-batch candidates and optional hard negatives.

    With B (query q_i, positive c_i) pairs, the candidates are the B positives followed by the hard negatives and
    s_ij is the cosine similarity of q_i and candidate j (inputs are L2-normalised here):

    .. math::
        \mathcal{L} = -\frac{1}{B} \sum_i \log \frac{\exp(s_{ii} / \tau)}{\sum_j \exp(s_{ij} / \tau)}

    a cross-entropy over all candidates with the query's own positive as the target: every other pair's positive
    and every hard negative is a negative.

    Args:
        temperature: tau, > 0; `scale = 1/temperature` (0.05 is sentence-transformers' `scale=20`).
        gather_across_devices: Score against the candidates of every rank (see [`gather_features`]).
        local_loss: With `gather_across_devices`, score only this rank's queries against all candidates:
            (B/W) x B logits instead of B x B, same gradient.
        gather_with_grad: With `gather_across_devices`, gather with gradient (default): each rank's gradient is the
            single-process gradient of the global batch. `False` is the release's plain all-gather: only local rows
            carry gradient, so the applied gradient is 1/W of it (see [`gather_features`]); not with `local_loss`.

    Requirements:
        1. Positives are distinct within the global batch.
        2. With `gather_across_devices`, every rank holds the same number of pairs and of hard negatives.

    Inputs:
        ===================  =============  ==================================================================
        argument             shape          meaning
        ===================  =============  ==================================================================
        query                (B, D)         query embeddings
        positive             (B, D)         the positive candidate of each query
        modality             (B,) long      modality id of each positive, i.e. the query's target modality;
                                            optional here, it only splits the diagnostics
        negatives            (B * n, D)     optional: n hard negatives per query, query-major; every query
                                            sees all of them
        negative_modality    (B * n,) long  modality id of each hard negative, needed with `modality`
        ===================  =============  ==================================================================

    Returns a dict: `loss`, then detached diagnostics: `pos_sim` (mean positive cosine), `intra_neg_sim` and
    `inter_neg_sim` (mean cosine of the negatives sharing / not sharing the query's target modality, each left out
    when the batch has none; without `modality` all are intra), `accuracy` (fraction of queries whose most
    similar candidate is their positive) and `num_candidates` (candidates scored per query, after any gather).

    Relations:
        - sentence-transformers' `MultipleNegativesRankingLoss` with cosine similarity and `scale = 1/temperature`.
        - [`MACLoss`] with `tau_hard == tau_norm == temperature` returns exactly this loss.

    Reference:
        PUMA (arXiv 2507.08064), stage 1: InfoNCE at tau = 0.05 plus hidden-state distillation.

    Example:
        >>> import torch
        >>> loss_fn = InfoNCELoss(temperature=0.05)
        >>> query = torch.randn(4, 8, requires_grad=True)
        >>> out = loss_fn(query, torch.randn(4, 8), negatives=torch.randn(8, 8))
        >>> out["loss"].backward()
        >>> sorted(out)
        ['accuracy', 'intra_neg_sim', 'loss', 'num_candidates', 'pos_sim']
    """

    def __init__(self, temperature: float = 0.05, gather_across_devices: bool = False, local_loss: bool = False,
                 gather_with_grad: bool = True):
        super().__init__(gather_across_devices, local_loss, gather_with_grad)
        _require(temperature > 0, "temperature", temperature, "> 0")
        self.temperature = temperature

    def _temperatures(self) -> tuple[float, float]:
        return self.temperature, self.temperature

    def get_config_dict(self) -> dict[str, object]:
        return {"temperature": self.temperature, **self._gather_config()}


class MACLoss(_ContrastiveLoss):
    r"""Modality-adaptive contrastive loss: InfoNCE with a harder temperature among same-modality candidates.

    Pair i's target modality m_i is the modality of its positive; candidate j (a positive or a hard negative) has
    modality m_j; s_ij is the cosine similarity of q_i and candidate j:

    .. math::
        \ell_{ij} = \begin{cases} s_{ij} / \tau_{hard} & m_j = m_i \text{ (intra-modality, the positive included)}
        \\ s_{ij} / \tau_{norm} & m_j \neq m_i \end{cases}
        \qquad \mathcal{L} = -\frac{1}{B} \sum_i \log \frac{\exp(\ell_{ii})}{\sum_j \exp(\ell_{ij})}

    A `tau_hard` below `tau_norm` sharpens the competition among candidates of the modality the query must
    retrieve, where the hard negatives are, while other modalities keep the milder `tau_norm`.

    Args:
        tau_norm: Inter-modality temperature, > 0 (`scale = 1/tau_norm`).
        tau_hard: Intra-modality temperature, > 0 (`scale = 1/tau_hard`); `None` means `tau_norm`. A settable
            attribute: the trainer updates it each step from [`tau_hard_schedule`].
        gather_across_devices, local_loss, gather_with_grad: As in [`InfoNCELoss`].

    Requirements:
        1. Positives are distinct within the global batch.
        2. Modality ids from one vocabulary shared by every batch and rank (`mbeir_puma.modality_id`, which the
           collator uses), on the embeddings' device (NCCL gathers CUDA tensors only).
        3. With `gather_across_devices`, every rank holds the same number of pairs and of hard negatives.

    Inputs and returned dict: as in [`InfoNCELoss`], with `modality` required (and `negative_modality` with
    `negatives`); hard negatives are intra or inter by their own modality, relative to the query's target.

    Relations:
        - `tau_hard == tau_norm` gives exactly [`InfoNCELoss`] at `temperature=tau_norm`.
        - A batch of a single modality gives InfoNCE at `tau_hard`.

    Reference:
        PUMA (arXiv 2507.08064), stage 2 (MAC-Loss); the defaults follow the release: `tau_norm = 0.03`,
        `tau_hard` from the schedule.

    Example:
        >>> import torch
        >>> loss_fn = MACLoss(tau_norm=0.03)
        >>> loss_fn.tau_hard = tau_hard_schedule(progress_epochs=0.5, total_epochs=2.0)
        >>> loss_fn.tau_hard
        0.023
        >>> query = torch.randn(4, 8, requires_grad=True)
        >>> out = loss_fn(query, torch.randn(4, 8), modality=torch.tensor([0, 0, 1, 2]))
        >>> out["loss"].backward()
        >>> sorted(out)
        ['accuracy', 'inter_neg_sim', 'intra_neg_sim', 'loss', 'num_candidates', 'pos_sim']
    """

    modality_required = True

    def __init__(
        self,
        tau_norm: float = 0.03,
        tau_hard: float | None = None,
        gather_across_devices: bool = False,
        local_loss: bool = False,
        gather_with_grad: bool = True,
    ):
        super().__init__(gather_across_devices, local_loss, gather_with_grad)
        _require(tau_norm > 0, "tau_norm", tau_norm, "> 0")
        self.tau_norm = tau_norm
        self.tau_hard = tau_hard

    @property
    def tau_hard(self) -> float:
        return self._tau_hard

    @tau_hard.setter
    def tau_hard(self, value: float | None) -> None:
        _require(value is None or value > 0, "tau_hard", value, "None or > 0")
        self._tau_hard = self.tau_norm if value is None else value

    def _temperatures(self) -> tuple[float, float]:
        return self.tau_hard, self.tau_norm

    def get_config_dict(self) -> dict[str, object]:
        return {"tau_norm": self.tau_norm, "tau_hard": self.tau_hard, **self._gather_config()}


class HiddenStateDistillLoss(_PumaLoss):
    r"""Pull the pruned student's embeddings towards the full-depth teacher's, vector by vector.

    .. math::
        \mathcal{L}_{mse} = w \big(\mathrm{MSE}(q^s, q^t) + \mathrm{MSE}(c^s, c^t)\big) \qquad
        \mathcal{L}_{cosine} = w \Big(\tfrac{1}{B} \sum_i (1 - \cos(q^s_i, q^t_i)) + \tfrac{1}{B} \sum_i (1 -
        \cos(c^s_i, c^t_i))\Big)

    MSE is the mean over all elements of the raw, unnormalised vectors (`F.mse_loss`).

    Args:
        metric: `"mse"` (release) or `"cosine"`.
        weight: w, >= 0. The release uses 0.05, inside the 0.1 weight of [`DistillationObjective`].

    Requirements:
        1. Student and teacher embeddings of the same inputs, row for row, of the same size.
        2. No gather under DDP: with equal shards, the average of the ranks' local means is the global mean.

    Inputs: `query`, `positive` `(B, D)` from the student; `teacher_query`, `teacher_positive` `(B, D)` from the
    teacher, which gets no gradient. Returns `{"loss": ...}`.

    Relations:
        - [`KLDistillLoss`] distils the teacher's similarity distribution instead of the vectors.

    Reference:
        PUMA (arXiv 2507.08064), stage 1: 0.9 x InfoNCE + 0.1 x (0.05 x MSE).

    Example:
        >>> import torch
        >>> student, teacher = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
        >>> HiddenStateDistillLoss(metric="mse", weight=0.05)(student, student, teacher, teacher)["loss"].backward()
    """

    METRICS = ("mse", "cosine")

    def __init__(self, metric: str = "mse", weight: float = 0.05):
        super().__init__()
        _require(metric in self.METRICS, "metric", metric, f"one of {self.METRICS}")
        _require(weight >= 0, "weight", weight, ">= 0")
        self.metric = metric
        self.weight = weight

    def compute_loss_from_embeddings(
        self, query: Tensor, positive: Tensor, teacher_query: Tensor, teacher_positive: Tensor
    ) -> dict[str, Tensor]:
        distance = 0.0
        for student, teacher in ((query, teacher_query), (positive, teacher_positive)):
            _require(student.shape == teacher.shape, "teacher shape", tuple(teacher.shape), str(tuple(student.shape)))
            # The teacher is the fixed target: a gradient through it would pull the teacher towards the student.
            student, teacher = at_least_fp32(student), at_least_fp32(teacher.detach())  # (b, d)
            if self.metric == "mse":
                distance = distance + F.mse_loss(student, teacher)
            else:
                distance = distance + (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        return {"loss": self.weight * distance}

    forward = compute_loss_from_embeddings  # nothing to gather (see Requirements)

    def get_config_dict(self) -> dict[str, object]:
        return {"metric": self.metric, "weight": self.weight}


class KLDistillLoss(_GatheredLoss):
    r"""Match the student's distribution over candidates to the teacher's.

    With s_ij (student) and t_ij (teacher) the cosine similarities of query i and candidate j (the positives, then
    the hard negatives), P^s_i = softmax_j(s_ij / tau) and P^t_i = softmax_j(t_ij / tau_t):

    .. math::
        \mathcal{L} = \frac{1}{B} \sum_i \mathrm{KL}(P^t_i \,\|\, P^s_i)
        = \frac{1}{B} \sum_i \sum_j P^t_{ij} (\log P^t_{ij} - \log P^s_{ij})

    Args:
        temperature: tau of the student, > 0 (`scale = 1/temperature`).
        teacher_temperature: tau_t of the teacher, > 0; `None` means `temperature`.
        gather_across_devices, local_loss, gather_with_grad: As in [`InfoNCELoss`].

    Requirements:
        1. Student and teacher embeddings of the same inputs, row for row (their sizes may differ).
        2. With `gather_across_devices`, every rank holds the same number of rows.

    Inputs: `query`, `positive` `(B, D)` and optional `negatives` `(B * n, D)` from the student; `teacher_query`,
    `teacher_positive` `(B, D')` and, with `negatives`, `teacher_negatives` `(B * n, D')` from the teacher, which
    gets no gradient. Returns `{"loss": ...}`.

    Relations:
        - Zero when student and teacher similarities agree and `teacher_temperature == temperature`.
        - [`HiddenStateDistillLoss`] matches the vectors themselves.

    Reference:
        PUMA (arXiv 2507.08064): distillation from the full-depth model into the layer-pruned one.

    Example:
        >>> import torch
        >>> query = torch.randn(4, 8, requires_grad=True)
        >>> out = KLDistillLoss(temperature=0.05)(query, torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8))
        >>> out["loss"].backward()
    """

    def __init__(
        self,
        temperature: float = 0.05,
        teacher_temperature: float | None = None,
        gather_across_devices: bool = False,
        local_loss: bool = False,
        gather_with_grad: bool = True,
    ):
        super().__init__(gather_across_devices, local_loss, gather_with_grad)
        _require(temperature > 0, "temperature", temperature, "> 0")
        teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
        _require(teacher_temperature > 0, "teacher_temperature", teacher_temperature, "> 0")
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        teacher_query: Tensor,
        teacher_positive: Tensor,
        negatives: Tensor | None = None,
        teacher_negatives: Tensor | None = None,
    ) -> dict[str, Tensor]:
        (query, teacher_query), candidates, _ = self._gather(
            (query, teacher_query), (positive, teacher_positive, negatives, teacher_negatives)
        )
        positive, teacher_positive, negatives, teacher_negatives = candidates
        return self.compute_loss_from_embeddings(
            query, positive, teacher_query, teacher_positive, negatives, teacher_negatives
        )

    def compute_loss_from_embeddings(
        self,
        query: Tensor,
        positive: Tensor,
        teacher_query: Tensor,
        teacher_positive: Tensor,
        negatives: Tensor | None = None,
        teacher_negatives: Tensor | None = None,
    ) -> dict[str, Tensor]:
        shape = None if teacher_negatives is None else tuple(teacher_negatives.shape)
        _require((negatives is None) == (shape is None), "teacher_negatives", shape, "given exactly with negatives")
        student = _cosine_scores(query, positive, negatives)  # (q, p + n)
        with torch.no_grad():  # the teacher is the fixed target
            teacher = _cosine_scores(teacher_query, teacher_positive, teacher_negatives)  # (q, p + n)
        expected = str(tuple(student.shape))
        _require(teacher.shape == student.shape, "teacher scores shape", tuple(teacher.shape), expected)
        loss = F.kl_div(
            F.log_softmax(student / self.temperature, dim=1),
            F.log_softmax(teacher / self.teacher_temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return {"loss": loss}

    def get_config_dict(self) -> dict[str, object]:
        return {
            "temperature": self.temperature,
            "teacher_temperature": self.teacher_temperature,
            **self._gather_config(),
        }


class DistillationObjective(_PumaLoss):
    r"""Weighted sum of a contrastive loss and optional distillation losses.

    .. math::
        \mathcal{L} = w_c \mathcal{L}_{contrastive} + w_d \mathcal{L}_{hidden} + w_{kl} \mathcal{L}_{KL}

    PUMA stage 1 is `0.9 x InfoNCE + 0.1 x distill`, where the hidden-state loss carries its own 0.05 (see the
    example). Each part gathers across devices as it is configured.

    Args:
        contrastive: [`InfoNCELoss`] or [`MACLoss`] (see [`build_loss`]); each part validates its own arguments.
        hidden_state, kl: Optional [`HiddenStateDistillLoss`] and [`KLDistillLoss`].
        contrastive_weight, distill_weight, kl_weight: w_c, w_d, w_kl, >= 0; a positive weight needs its part.

    Requirements: those of each part.

    Inputs: the contrastive loss's (`query`, `positive`, `modality`, `negatives`, `negative_modality`) and the
    teacher's `teacher_query`, `teacher_positive` and, for `kl` with hard negatives, `teacher_negatives`. Returns a
    dict: `loss`, the weighted total to backpropagate; the unweighted, detached parts `contrastive_loss`,
    `distill_loss` and `kl_loss` (for the parts given, even at weight 0); the contrastive loss's diagnostics.

    Relations: without distillation parts and with `contrastive_weight=1`, the contrastive loss itself.

    Reference: PUMA (arXiv 2507.08064), stage 1 (InfoNCE with hidden-state distillation).

    Example:
        >>> import torch
        >>> objective = DistillationObjective(
        ...     InfoNCELoss(temperature=0.05),
        ...     hidden_state=HiddenStateDistillLoss(metric="mse", weight=0.05),
        ...     contrastive_weight=0.9,
        ...     distill_weight=0.1,
        ... )
        >>> query, positive = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
        >>> out = objective(query, positive, teacher_query=torch.randn(4, 8), teacher_positive=torch.randn(4, 8))
        >>> out["loss"].backward()
        >>> [key for key in out if key.endswith("loss")]
        ['loss', 'contrastive_loss', 'distill_loss']
    """

    def __init__(
        self,
        contrastive: InfoNCELoss | MACLoss,
        hidden_state: HiddenStateDistillLoss | None = None,
        kl: KLDistillLoss | None = None,
        contrastive_weight: float = 0.9,
        distill_weight: float = 0.1,
        kl_weight: float = 0.0,
    ):
        super().__init__()
        for name, weight, part in (
            ("contrastive_weight", contrastive_weight, contrastive),
            ("distill_weight", distill_weight, hidden_state),
            ("kl_weight", kl_weight, kl),
        ):
            _require(weight >= 0, name, weight, ">= 0")
            _require(weight == 0 or part is not None, name, weight, "0 when its loss is not given")
        self.contrastive, self.hidden_state, self.kl = contrastive, hidden_state, kl
        self.contrastive_weight, self.distill_weight, self.kl_weight = contrastive_weight, distill_weight, kl_weight

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        teacher_query: Tensor | None = None,
        teacher_positive: Tensor | None = None,
        modality: Tensor | None = None,
        negatives: Tensor | None = None,
        negative_modality: Tensor | None = None,
        teacher_negatives: Tensor | None = None,
    ) -> dict[str, Tensor]:
        contrastive = self.contrastive(query, positive, modality, negatives, negative_modality)
        total = self.contrastive_weight * contrastive["loss"]
        parts = {"contrastive_loss": contrastive["loss"].detach()}
        if self.hidden_state is not None:
            distill = self.hidden_state(query, positive, teacher_query, teacher_positive)["loss"]
            total = total + self.distill_weight * distill
            parts["distill_loss"] = distill.detach()
        if self.kl is not None:
            kl = self.kl(query, positive, teacher_query, teacher_positive, negatives, teacher_negatives)["loss"]
            total = total + self.kl_weight * kl
            parts["kl_loss"] = kl.detach()
        diagnostics = {key: value for key, value in contrastive.items() if key != "loss"}
        return {"loss": total, **parts, **diagnostics}

    def get_config_dict(self) -> dict[str, object]:
        parts = {"contrastive": self.contrastive, "hidden_state": self.hidden_state, "kl": self.kl}
        config = {
            name: None if part is None else {"loss": type(part).__name__, **part.get_config_dict()}
            for name, part in parts.items()
        }
        weights = {
            "contrastive_weight": self.contrastive_weight,
            "distill_weight": self.distill_weight,
            "kl_weight": self.kl_weight,
        }
        return {**config, **weights}


STARBUCKS_CITATION = """@misc{zhuang2024starbucks,
    title = {Starbucks: Improved Training for {2D} Matryoshka Embeddings},
    author = {Zhuang, Shengyao and Wang, Shuai and Koopman, Bevan and Zuccon, Guido},
    year = {2024},
    eprint = {2410.13230},
    archivePrefix = {arXiv},
}"""
MATRYOSHKA_2D_CITATION = """@misc{li2024twodmse,
    title = {{2D} Matryoshka Sentence Embeddings},
    author = {Li, Xianming and Li, Zongxi and Li, Jing and Xie, Haoran and Li, Qing},
    year = {2024},
    eprint = {2402.14776},
    archivePrefix = {arXiv},
}"""
PAIR_MODES = ("grid", "diagonal")


def _check_sizes(name: str, values, weights_name: str, weights) -> list[float]:
    """Validates an increasing list of positive sizes and its weights (default 1 each); returns the weights."""
    _require(isinstance(values, (list, tuple)) and len(values) > 0, name, values, "a non-empty list")
    _require(all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values), name, values,
             "positive integers")
    _require(all(a < b for a, b in zip(values, values[1:])), name, values, "strictly increasing")
    if weights is None:
        return [1.0] * len(values)
    _require(isinstance(weights, (list, tuple)) and len(weights) == len(values), weights_name, weights,
             f"a list of {len(values)} weights, one per entry of {name}")
    _require(all(0 <= float(w) < math.inf for w in weights), weights_name, weights, "finite and >= 0")
    return [float(w) for w in weights]


def _truncate(tensor: Tensor | None, dim: int | None) -> Tensor | None:
    """The first `dim` coordinates of each row (`None`: all); the losses normalise what they score."""
    if tensor is None or dim is None:
        return tensor
    _require(dim <= tensor.shape[-1], "matryoshka_dims entry", dim, f"<= the embedding size {tensor.shape[-1]}")
    return tensor[..., :dim]


class ElasticObjective(_PumaLoss):
    r"""Loss modifier: a [`DistillationObjective`] trained at several depths and embedding sizes at once.

    The inputs are the raw embeddings of the model truncated after each of its first d_1 < ... < d_K layers, all
    from one forward pass (`PumaForEmbedding.forward(output_depths=...)`: the final norm is applied at every depth).
    With Matryoshka sizes m_1 < ... < m_M (none: the full size), the trained pairs P are

    - `"grid"`: every (d_i, m_j), as 2D Matryoshka (arXiv 2402.14776) but all pairs at every step;
    - `"diagonal"`: (d_i, m_i), Starbucks' fixed list from small to large (arXiv 2410.13230), which matched separately
      trained models where sampling a random pair per step fell short; it needs as many sizes as depths.

    With e^d the raw embedding at depth d, e^d_{:m} its first m coordinates (each loss normalises what it scores),
    D the full size, t the external teacher's embedding and sg() a stopped gradient:

    .. math::
        \mathcal{L} = w_c \sum_{(d, m) \in P} \alpha_d \beta_m \mathcal{L}_{contrastive}(e^{d}_{:m})
        + w_d \mathcal{L}_{hidden}(e^{d_K}, t) + w_{kl} \mathcal{L}_{KL}(e^{d_K}, t)
        + w_{sd} \sum_{d < d_K} \mathcal{L}_{hidden}(e^{d}, \mathrm{sg}(e^{d_K}))
        + w_{skl} \sum_{(d, m) \in P,\ (d, m) \neq (d_K, D)} \mathcal{L}_{KL}(e^{d}_{:m}, \mathrm{sg}(e^{d_K}))

    1. The wrapped objective's contrastive loss (MAC or InfoNCE) at every pair, weighted by the pair's depth weight
       alpha_d times its size weight beta_m, summed (as sentence-transformers' `MatryoshkaLoss` sums; weights that
       add up to 1 give a mean), then scaled by the objective's `contrastive_weight` w_c.
    2. The wrapped objective's distillation from the external teacher (the full, unpruned model), at the deepest
       depth and full size only: that is the model PUMA distils, and the shallower depths reach the teacher through
       the deepest one (term 3), rather than being pulled towards a target several layers beyond their reach.
    3. Optional self-distillation of each shallower depth towards the deepest, at full size: vector by vector
       (`self_distill`, a [`HiddenStateDistillLoss`]) and/or by in-batch similarity distribution at every other pair
       (`self_kl`, a [`KLDistillLoss`], as Starbucks does). The deepest embedding is detached: it is the target, and a
       gradient through it would pull the full model towards its weaker truncations.

    Args:
        objective: The [`DistillationObjective`] to train at every pair; it owns the contrastive loss (and its
            temperatures and gather settings) and the teacher distillation.
        depths: d_1 < ... < d_K, numbers of first decoder layers, the last being the model's kept depth.
        matryoshka_dims: m_1 < ... < m_M, embedding sizes; `None` trains the full size only.
        depth_weights, matryoshka_weights: alpha and beta, >= 0, one per depth / size; default 1 each.
        pairs: `"grid"` (default) or `"diagonal"`; the same when either list has one entry.
        self_distill, self_kl: Optional self-distillation losses; `self_kl` must gather as the contrastive loss does.
        self_distill_weight, self_kl_weight: w_sd, w_skl, >= 0; a positive weight needs its loss.
        sample_pairs: `None` (default): P is every trained pair at every call. n: P is, at each call, the deepest
            pair at full size plus n of the others drawn uniformly without replacement, each at its own weight (the
            schedule of sentence-transformers' `AdaptiveLayerLoss`, which always trains the last layer and samples
            the others); the contrastive and self-KL terms follow the draw. `pairs_this_step()` draws.
        seed: Seed of the draws' own generator (the same in every process, so that all draw the same pairs).

    Requirements:
        1. Those of the wrapped objective.
        2. `query`, `positive` and, with hard negatives, `negatives` map every depth of `depths` to the raw
           embeddings `(rows, D)` at that depth, all of the same rows.

    Inputs: as [`DistillationObjective`], with `query`, `positive` and `negatives` dicts `{depth: (rows, D)}`; the
    teacher's embeddings and the modality ids stay single tensors.

    Returns a dict: `loss`, the total to backpropagate; then detached: `contrastive_loss` (the weighted sum of term 1,
    before w_c), `distill_loss` and `kl_loss` (term 2, as the wrapped objective names them),
    `contrastive_loss_d{d}_m{m}` and `accuracy_d{d}_m{m}` at each pair (`_m{m}` left out without
    `matryoshka_dims`), `self_distill_loss_d{d}` and `self_kl_loss_d{d}_m{m}` (term 3, unweighted), and the
    contrastive diagnostics (`pos_sim`, ...) of the deepest pair.

    Relations:
        - With one depth and no `matryoshka_dims`, exactly the wrapped objective.
        - sentence-transformers' `AdaptiveLayerLoss`, `MatryoshkaLoss` and `Matryoshka2dLoss` train text encoders
          at sampled layers, whose hidden states skip the final norm; here every depth is the embedding the model
          truncated to that depth computes, and every pair trains at every step.

    Reference:
        PUMA (arXiv 2507.08064); Starbucks (arXiv 2410.13230); 2D Matryoshka Sentence Embeddings (arXiv 2402.14776).

    Example:
        >>> import torch
        >>> objective = ElasticObjective(
        ...     DistillationObjective(MACLoss(tau_norm=0.03), contrastive_weight=1.0, distill_weight=0.0),
        ...     depths=[1, 2, 3], matryoshka_dims=[4, 8, 16], pairs="diagonal",
        ...     self_kl=KLDistillLoss(temperature=0.03), self_kl_weight=0.5,
        ... )
        >>> query = {d: torch.randn(4, 16, requires_grad=True) for d in (1, 2, 3)}
        >>> positive = {d: torch.randn(4, 16, requires_grad=True) for d in (1, 2, 3)}
        >>> out = objective(query, positive, modality=torch.tensor([0, 1, 0, 1]))
        >>> out["loss"].backward()
        >>> sorted(key for key in out if key.startswith("contrastive_loss_"))
        ['contrastive_loss_d1_m4', 'contrastive_loss_d2_m8', 'contrastive_loss_d3_m16']
    """

    def __init__(
        self,
        objective: DistillationObjective,
        depths: list[int],
        matryoshka_dims: list[int] | None = None,
        depth_weights: list[float] | None = None,
        matryoshka_weights: list[float] | None = None,
        pairs: str = "grid",
        self_distill: HiddenStateDistillLoss | None = None,
        self_kl: KLDistillLoss | None = None,
        self_distill_weight: float = 0.0,
        self_kl_weight: float = 0.0,
        sample_pairs: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        _require(isinstance(objective, DistillationObjective), "objective", type(objective).__name__,
                 "a DistillationObjective")
        self.objective = objective
        self.depths, self.depth_weights = list(depths or []), _check_sizes("depths", depths, "depth_weights",
                                                                           depth_weights)
        self.matryoshka_dims = list(matryoshka_dims) if matryoshka_dims is not None else None
        self.matryoshka_weights = None
        dims, dim_weights = [None], [1.0]
        if matryoshka_dims is not None:
            dims = self.matryoshka_dims
            dim_weights = self.matryoshka_weights = _check_sizes("matryoshka_dims", matryoshka_dims,
                                                                 "matryoshka_weights", matryoshka_weights)
        else:
            _require(matryoshka_weights is None, "matryoshka_weights", matryoshka_weights, "None without matryoshka_dims")
        _require(pairs in PAIR_MODES, "pairs", pairs, f"one of {PAIR_MODES}")
        self.pairs = pairs
        by_depth = list(zip(self.depths, self.depth_weights))
        by_dim = list(zip(dims, dim_weights))
        if pairs == "diagonal" and len(by_depth) > 1 and len(by_dim) > 1:
            _require(len(by_dim) == len(by_depth), "matryoshka_dims", matryoshka_dims,
                     f"one size per depth ({len(by_depth)}) with pairs='diagonal'")
            chosen = [(depth, dim) for depth, dim in zip(by_depth, by_dim)]
        else:  # every pair; the same as the diagonal when one of the lists has a single entry
            chosen = [(depth, dim) for depth in by_depth for dim in by_dim]
        # (depth, size or None, alpha * beta), the deepest pair last
        self.trained_pairs = [(depth, dim, alpha * beta) for (depth, alpha), (dim, beta) in chosen]

        for name, weight, part in (("self_distill_weight", self_distill_weight, self_distill),
                                   ("self_kl_weight", self_kl_weight, self_kl)):
            _require(weight >= 0, name, weight, ">= 0")
            _require(weight == 0 or part is not None, name, weight, "0 when its loss is not given")
        _require(self_distill is None or len(self.depths) > 1, "self_distill", self_distill,
                 "None with a single depth (there is no shallower depth to distil)")
        if self_kl is not None:
            _require(len(self.trained_pairs) > 1 or self.trained_pairs[0][1] is not None, "self_kl", self_kl,
                     "None when the only pair is the deepest depth at full size")
            wanted = objective.contrastive._gather_config()
            _require(self_kl._gather_config() == wanted, "self_kl gather settings", self_kl._gather_config(),
                     f"those of the contrastive loss, {wanted}")
        self.self_distill, self.self_kl = self_distill, self_kl
        self.self_distill_weight, self.self_kl_weight = self_distill_weight, self_kl_weight
        others = len(self.trained_pairs) - 1
        _require(sample_pairs is None or (isinstance(sample_pairs, int) and 0 < sample_pairs <= others),
                 "sample_pairs", sample_pairs, f"None or 1..{others} (the pairs besides the deepest at full size)")
        self.sample_pairs, self.seed = sample_pairs, seed
        # Its own generator, seeded alike in every process, so that all processes draw the same pairs at each call
        # whatever else consumes the global random state.
        self._generator = torch.Generator().manual_seed(seed)

    # The wrapped objective's parts, read by the trainer (temperature schedule, teacher checks).
    @property
    def contrastive(self) -> InfoNCELoss | MACLoss:
        return self.objective.contrastive

    @property
    def hidden_state(self) -> HiddenStateDistillLoss | None:
        return self.objective.hidden_state

    @property
    def kl(self) -> KLDistillLoss | None:
        return self.objective.kl

    @property
    def citation(self) -> str:
        return "\n\n".join((CITATION, STARBUCKS_CITATION, MATRYOSHKA_2D_CITATION))

    def forward(
        self,
        query: dict[int, Tensor],
        positive: dict[int, Tensor],
        teacher_query: Tensor | None = None,
        teacher_positive: Tensor | None = None,
        modality: Tensor | None = None,
        negatives: dict[int, Tensor] | None = None,
        negative_modality: Tensor | None = None,
        teacher_negatives: Tensor | None = None,
    ) -> dict[str, Tensor]:
        return self._loss(query, positive, teacher_query, teacher_positive, modality, negatives, negative_modality,
                          teacher_negatives, gather=True)

    def compute_loss_from_embeddings(self, *args, **kwargs) -> dict[str, Tensor]:
        """The loss in one process, without any gather; the arguments of `forward`."""
        return self._loss(*args, gather=False, **kwargs)

    def _check_depths(self, query: dict, positive: dict, negatives: dict | None) -> None:
        for name, embeddings in (("query", query), ("positive", positive), ("negatives", negatives)):
            if embeddings is not None:
                keys = sorted(embeddings) if isinstance(embeddings, dict) else type(embeddings).__name__
                _require(isinstance(embeddings, dict) and set(self.depths) <= set(embeddings), f"{name} depths",
                         keys, f"a dict holding the embeddings at every depth of {self.depths}")

    def pairs_this_step(self) -> list[tuple[int, int | None, float]]:
        """The (depth, size, weight) pairs of one call: every trained pair, or with `sample_pairs` = n the deepest
        pair at full size plus n of the others drawn without replacement (in their order), each at its own weight."""
        if self.sample_pairs is None:
            return self.trained_pairs
        *others, deepest = self.trained_pairs
        drawn = torch.randperm(len(others), generator=self._generator)[:self.sample_pairs].sort().values.tolist()
        return [others[i] for i in drawn] + [deepest]

    def _loss(self, query, positive, teacher_query=None, teacher_positive=None, modality=None, negatives=None,
              negative_modality=None, teacher_negatives=None, *, gather: bool) -> dict[str, Tensor]:
        self._check_depths(query, positive, negatives)
        pairs = self.pairs_this_step()
        objective, deepest = self.objective, self.depths[-1]
        deepest_negatives = None if negatives is None else negatives[deepest]
        # scored[d]: depth d's (query, positive, negatives) as the contrastive loss and the self-KL score them, gathered
        # once per depth (their gather settings are the same); the vector distillation compares the local rows.
        scored, label_offset, ids = {}, 0, (modality, negative_modality)
        for depth in self.depths:
            rows = (query[depth],), (positive[depth], modality, None if negatives is None else negatives[depth],
                                     negative_modality)
            (q,), (p, m, n, nm), label_offset = self.contrastive._gather(*rows) if gather else (*rows, 0)
            scored[depth], ids = (q, p, n), (m, nm)
        modality, negative_modality = ids  # gathered as the candidates they label
        contrastive, pair_parts, diagnostics = 0.0, {}, {}
        for depth, dim, weight in pairs:
            suffix = f"_d{depth}" + ("" if dim is None else f"_m{dim}")
            q, p, n = (_truncate(t, dim) for t in scored[depth])
            out = self.contrastive.compute_loss_from_embeddings(q, p, modality, n, negative_modality, label_offset)
            term = weight * out["loss"]
            contrastive = term if isinstance(contrastive, float) else contrastive + term
            pair_parts[f"contrastive_loss{suffix}"] = out["loss"].detach()
            pair_parts[f"accuracy{suffix}"] = out["accuracy"]
            diagnostics = {key: value for key, value in out.items() if key != "loss"}  # the deepest pair's, in the end
        total = objective.contrastive_weight * contrastive
        parts = {"contrastive_loss": contrastive.detach()}

        # 2. The external teacher, at the deepest depth and full size (the wrapped objective's own parts).
        if objective.hidden_state is not None:
            distill = objective.hidden_state(query[deepest], positive[deepest], teacher_query, teacher_positive)["loss"]
            total = total + objective.distill_weight * distill
            parts["distill_loss"] = distill.detach()
        if objective.kl is not None:
            kl_loss = objective.kl if gather else objective.kl.compute_loss_from_embeddings
            kl = kl_loss(query[deepest], positive[deepest], teacher_query, teacher_positive, deepest_negatives,
                         teacher_negatives)["loss"]
            total = total + objective.kl_weight * kl
            parts["kl_loss"] = kl.detach()
        parts.update(pair_parts)

        # 3. Self-distillation towards the deepest depth at full size. The target is detached: a gradient through it
        #    would pull the full model towards its weaker truncations.
        if self.self_distill is not None:
            self_distill = 0.0
            for depth in self.depths[:-1]:
                loss = self.self_distill.compute_loss_from_embeddings(
                    query[depth], positive[depth], query[deepest].detach(), positive[deepest].detach())["loss"]
                self_distill = self_distill + loss
                parts[f"self_distill_loss_d{depth}"] = loss.detach()
            total = total + self.self_distill_weight * self_distill
        if self.self_kl is not None:
            target = [None if t is None else t.detach() for t in scored[deepest]]
            self_kl = 0.0
            for depth, dim, _ in pairs:
                if depth == deepest and (dim is None or dim >= target[0].shape[-1]):
                    continue  # the target itself
                q, p, n = (_truncate(t, dim) for t in scored[depth])
                loss = self.self_kl.compute_loss_from_embeddings(q, p, *target[:2], n, target[2])["loss"]
                self_kl = self_kl + loss
                parts[f"self_kl_loss_d{depth}" + ("" if dim is None else f"_m{dim}")] = loss.detach()
            total = total + self.self_kl_weight * self_kl
        return {"loss": total, **parts, **diagnostics}

    def get_config_dict(self) -> dict[str, object]:
        def part(loss):
            return None if loss is None else {"loss": type(loss).__name__, **loss.get_config_dict()}

        return {
            "objective": self.objective.get_config_dict(),
            "depths": self.depths,
            "depth_weights": self.depth_weights,
            "matryoshka_dims": self.matryoshka_dims,
            "matryoshka_weights": self.matryoshka_weights,
            "pairs": self.pairs,
            "self_distill": part(self.self_distill),
            "self_kl": part(self.self_kl),
            "self_distill_weight": self.self_distill_weight,
            "self_kl_weight": self.self_kl_weight,
            "sample_pairs": self.sample_pairs,
            "seed": self.seed,
        }


LOSSES = {"infonce": InfoNCELoss, "mac": MACLoss}


def build_loss(name: str, **kwargs) -> InfoNCELoss | MACLoss:
    """The contrastive loss named in a training configuration, `"infonce"` or `"mac"`, built with `kwargs`.

    Example:
        >>> build_loss("mac", tau_norm=0.03).get_config_dict()
        {'tau_norm': 0.03, 'tau_hard': 0.03, 'gather_across_devices': False, 'local_loss': False, 'gather_with_grad': True}
    """
    _require(name in LOSSES, "loss name", name, f"one of {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)
