"""The consistency target point x_r: ECT's single-sample estimate and SCT's variance-reduced one.

ECT (docs/algorithms.md §3 step 3): x_r = x + r·ε  (one Euler step of the PF-ODE with velocity ε).
SCT (docs/algorithms.md §4.1): x_r = (r/t)·x_t + (1 − r/t)·x̂_0, x̂_0 = Σ_j w_j·y_j, w = softmax_j(−‖x_t − y_j‖²/(2t²)).

We write SCT's point as ECT's plus a correction, x_r = x + r·ε + (1 − r/t)·(x̂_0 − x), which is the
same formula (substitute x_t = x + t·ε) without the cancellation of (r/t)·x_t at small t, and makes
`ref_batch = 1` reduce to ECT bit for bit (x̂_0 − x = 1·x − x = 0).
"""

from __future__ import annotations

import torch


def reference_set(
    x_batch: torch.Tensor,
    batch_idx: torch.Tensor,
    dataset: torch.Tensor,
    *,
    n: int | str,
    labels: torch.Tensor | None = None,
    dataset_labels: torch.Tensor | None = None,
    null_label: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """References {y_j} for a minibatch and the mask of which (sample, reference) pairs count.

    The minibatch comes first (so every sample's own x is a reference, as in STF); for n > B the
    rest are n − B random dataset images not in the minibatch; n = "all" uses the whole dataset. For
    n < B each sample uses itself and the n − 1 following minibatch samples (cyclically).
    Conditional (labels given): only same-class references count (docs/algorithms.md §4.1); a sample whose
    label was dropped to `null_label` (classic CFG's label dropout) is unconditional: every reference counts.
    Returns (refs [n, ...], valid [B, n] bool, ref_labels or None).
    """
    B, N = x_batch.shape[0], dataset.shape[0]
    dev = x_batch.device
    n_total = N if n == "all" else int(n)
    if n_total <= B:
        refs, ref_idx = x_batch, batch_idx
        offset = (torch.arange(B, device=dev)[None, :] - torch.arange(B, device=dev)[:, None]) % B
        valid = offset < n_total
    else:
        # Extra references: n − B dataset images outside the minibatch, uniformly at random. Random
        # keys with minibatch samples pushed last + topk: fixed shapes, no host synchronisation.
        in_batch = torch.zeros(N, dtype=torch.bool, device=dataset.device)
        in_batch.index_fill_(0, batch_idx.to(dataset.device), True)  # a scalar fill: no host-to-device copy
        keys = torch.rand(N, device=dataset.device) + 2.0 * in_batch
        pool = keys.topk(n_total - B, largest=False, sorted=False).indices
        ref_idx = torch.cat([batch_idx, pool.to(dev)])
        refs = torch.cat([x_batch, dataset[pool].to(dev)])
        valid = torch.ones(B, refs.shape[0], dtype=torch.bool, device=dev)
    ref_labels = None
    if labels is not None and dataset_labels is not None:
        ref_labels = dataset_labels.to(dev)[ref_idx]
        same = ref_labels[None, :] == labels[:, None]
        if null_label is not None:
            same = same | (labels[:, None] == null_label)
        valid = valid & same
    return refs, valid, ref_labels


def posterior_weights(x_t: torch.Tensor, t: torch.Tensor, refs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """w_bj = softmax_j(ℓ_bj), ℓ_bj = −‖x_t,b − y_j‖²/(2 t_b²); invalid pairs get −∞ (docs/algorithms.md §4.1).

    Always fp32, also under bf16 autocast.
    """
    with torch.autocast(x_t.device.type, enabled=False):
        return _posterior_weights_fp32(x_t, t, refs, valid)


def _posterior_weights_fp32(x_t: torch.Tensor, t: torch.Tensor, refs: torch.Tensor, valid: torch.Tensor):
    xf = x_t.flatten(1).float()
    yf = refs.flatten(1).float()
    # ‖x − y‖² = ‖x‖² + ‖y‖² − 2 x·y: one matmul for the whole B × n distance matrix.
    d2 = (xf.square().sum(1, keepdim=True) + yf.square().sum(1)[None, :] - 2.0 * xf @ yf.T).clamp_min(0.0)
    logits = -d2 / (2.0 * t.flatten().float()[:, None] ** 2)
    logits = logits.masked_fill(~valid, float("-inf"))
    return torch.softmax(logits, dim=1)  # softmax subtracts the row max first


def sct_x0_offset(
    x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, refs: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0 − x, effective sample size 1/Σ_j w_j² per sample)."""
    w = posterior_weights(x_t, t, refs, valid)
    with torch.autocast(x.device.type, enabled=False):
        x0_hat = (w @ refs.flatten(1).float()).reshape(x.shape)
    ess = 1.0 / w.square().sum(1)
    return x0_hat - x, ess


def target_point(
    x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor, x0_offset: torch.Tensor | None = None
) -> torch.Tensor:
    """x_r = x + r·ε (ECT), plus (1 − r/t)·(x̂_0 − x) for SCT. t, r: [B, 1, 1, 1]."""
    x_r = x + r * eps
    if x0_offset is not None:
        x_r = x_r + (1.0 - r / t) * x0_offset
    return x_r
