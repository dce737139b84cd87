"""Losses against explicit oracles written here, plus the cross-rank gather on a real 2-process
gloo group."""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from composeae.losses import (
    batch_classification_loss,
    gather_with_grad,
    reconstruction_loss,
    sample_soft_triplets,
    soft_triplet_loss,
)

# -- oracles -----------------------------------------------------------------------------------


def soft_triplet_oracle(query, target, scale, negatives, normalize=True):
    """The official formula as a plain loop over triplets: x = s * x / |x| on [query; target]
    (the official NormalizationLayer), d = squared L2 distance, loss = mean log(1 + exp(d_ij -
    d_ik)). normalize=False applies the formula to the given features as they are."""
    batch = query.shape[0]
    x = torch.cat([query, target])
    if normalize:
        x = scale * x / torch.norm(x, dim=1, keepdim=True)
    terms = []
    for i in range(2 * batch):
        j = (i + batch) % (2 * batch)
        for k in negatives[i].tolist():
            d_ij = ((x[i] - x[j]) ** 2).sum()
            d_ik = ((x[i] - x[k]) ** 2).sum()
            terms.append(torch.log(1 + torch.exp(d_ij - d_ik)))
    return torch.stack(terms).mean()


def legacy_backward_oracle(features, negatives):
    """What the official legacy autograd Function's backward returned for features (2B, D), as
    its loop writes it (f * feature differences, no factor 2)."""
    batch = features.shape[0] // 2
    triplets = [(i, (i + batch) % (2 * batch), k)
                for i, row in enumerate(negatives.tolist()) for k in row]
    dist_sq = torch.cdist(features, features) ** 2
    grad = torch.zeros_like(features)
    for i, j, k in triplets:
        f = 1.0 - 1.0 / (1.0 + math.exp(float(dist_sq[i, j] - dist_sq[i, k])))
        grad[i] += f * (features[i] - features[j]) / len(triplets)
        grad[j] += f * (features[j] - features[i]) / len(triplets)
        grad[i] += -f * (features[i] - features[k]) / len(triplets)
        grad[k] += -f * (features[k] - features[i]) / len(triplets)
    return grad


def classification_oracle(query, target, scale, symmetric):
    """Cross-entropy written out: logits_ij = s^2 cos(q_i, t_j); -logit_ii + logsumexp_j."""
    qn = query / query.norm(dim=1, keepdim=True)
    tn = target / target.norm(dim=1, keepdim=True)
    logits = (scale * qn) @ (scale * tn).T
    forward = (-logits.diagonal() + torch.logsumexp(logits, dim=1)).mean()
    if not symmetric:
        return forward
    backward = (-logits.diagonal() + torch.logsumexp(logits, dim=0)).mean()
    return (forward + backward) / 2


def leaves(*shapes, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype).to(device).requires_grad_()
            for shape in shapes]


# The CUDA runs (sparse kernels, cuBLAS) happen wherever a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# -- soft triplet ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,per_anchor", [(2, 3), (5, 3), (16, 3), (7, 5)])
def test_soft_triplet_matches_loop_oracle_value_and_gradient(device, dtype, batch, per_anchor):
    query, target, scale = leaves((batch, 24), (batch, 24), (), dtype=dtype, seed=batch,
                                  device=device)
    with torch.no_grad():
        scale.copy_(torch.tensor(4.0))  # the official initial scale
    table = sample_soft_triplets(batch, per_anchor, generator=torch.Generator().manual_seed(1))
    ours = soft_triplet_loss(query, target, scale=scale, negatives=table)
    grads = torch.autograd.grad(ours, [query, target, scale])
    oracle = soft_triplet_oracle(query, target, scale, table)
    expected = torch.autograd.grad(oracle, [query, target, scale])
    assert abs(ours.item() - oracle.item()) < 1e-5
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_soft_triplet_generator_and_injected_table_agree():
    query, target = leaves((6, 8), (6, 8))
    sampled = soft_triplet_loss(query, target, generator=torch.Generator().manual_seed(3))
    table = sample_soft_triplets(6, generator=torch.Generator().manual_seed(3))
    injected = soft_triplet_loss(query, target, negatives=table)
    assert sampled.item() == injected.item()
    assert injected.item() == pytest.approx(soft_triplet_oracle(query, target, 1.0, table).item(),
                                            abs=1e-12)


def test_official_legacy_backward_is_half_the_true_gradient():
    # The legacy Function received the already normalised-and-scaled features (2B, D).
    query, target = leaves((5, 16), (5, 16), seed=4)
    table = sample_soft_triplets(5, generator=torch.Generator().manual_seed(0))
    features = (4.0 * F.normalize(torch.cat([query, target]), dim=1)).detach().requires_grad_()
    loss = soft_triplet_oracle(features[:5], features[5:], 1.0, table, normalize=False)
    (true_grad,) = torch.autograd.grad(loss, features)
    legacy = legacy_backward_oracle(features.detach(), table)
    torch.testing.assert_close(2 * legacy, true_grad, atol=1e-10, rtol=1e-8)


def test_official_gradient_option_is_the_legacy_backward_through_the_normalisation():
    query, target, scale = leaves((5, 16), (5, 16), (), seed=6)
    with torch.no_grad():
        scale.copy_(torch.tensor(4.0))
    table = sample_soft_triplets(5, generator=torch.Generator().manual_seed(2))
    exact = soft_triplet_loss(query, target, scale=scale, negatives=table)
    official = soft_triplet_loss(query, target, scale=scale, negatives=table, gradient="official")
    assert official.item() == exact.item()  # only the backward differs
    exact_grads = torch.autograd.grad(exact, [query, target, scale])
    official_grads = torch.autograd.grad(official, [query, target, scale])
    # The official run: NormalizationLayer (s x / |x|), then the legacy Function's backward.
    features = scale * F.normalize(torch.cat([query, target]), dim=1)
    legacy = legacy_backward_oracle(features.detach(), table)
    expected = torch.autograd.grad(features, [query, target, scale], grad_outputs=legacy)
    for got, want, true in zip(official_grads, expected, exact_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(got, true / 2, atol=1e-10, rtol=1e-8)
    with pytest.raises(ValueError, match="gradient"):
        soft_triplet_loss(query, target, negatives=table, gradient="half")


@pytest.mark.parametrize("batch,per_anchor", [(2, 3), (3, 3), (8, 3), (8, 14), (8, 40)])
def test_sampled_negatives_are_distinct_and_from_other_pairs(batch, per_anchor):
    table = sample_soft_triplets(batch, per_anchor, generator=torch.Generator().manual_seed(0))
    m = min(per_anchor, 2 * batch - 2)
    assert table.shape == (2 * batch, m) and table.dtype == torch.long
    for i, negatives in enumerate(table.tolist()):
        assert len(set(negatives)) == m
        assert all(0 <= k < 2 * batch and k % batch != i % batch for k in negatives)


def test_sampler_draws_every_subset_of_negatives_equally_often():
    # B = 4: an anchor has 6 candidates, so C(6, 3) = 20 possible negative sets, each expected
    # 200 times in 4000 draws (std ~14; the band is 5 sigma). Anchor 0 (query half) and anchor 5
    # (target half, whose walk wraps around) both.
    gen = torch.Generator().manual_seed(0)
    seen = {0: {}, 5: {}}
    for _ in range(4000):
        table = sample_soft_triplets(4, generator=gen)
        for anchor, counts in seen.items():
            subset = tuple(sorted(table[anchor].tolist()))
            counts[subset] = counts.get(subset, 0) + 1
    for anchor, counts in seen.items():
        assert len(counts) == 20
        assert all(k % 4 != anchor % 4 for subset in counts for k in subset)
        assert max(abs(c - 200) for c in counts.values()) < 70


def test_soft_triplet_is_deterministic_given_a_seed_and_rejects_tiny_batches():
    query, target = leaves((4, 8), (4, 8))
    a = soft_triplet_loss(query, target, generator=torch.Generator().manual_seed(9))
    b = soft_triplet_loss(query, target, generator=torch.Generator().manual_seed(9))
    assert a.item() == b.item()
    with pytest.raises(ValueError):
        soft_triplet_loss(query[:1], target[:1])
    with pytest.raises(ValueError):
        soft_triplet_loss(query, target[:3])


# -- batch-based classification ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3, 33])
@pytest.mark.parametrize("symmetric", [False, True])
def test_batch_classification_matches_formula_and_scale_learns(device, batch, symmetric):
    query, target, scale = leaves((batch, 12), (batch, 12), (1,), seed=batch, device=device)
    with torch.no_grad():
        scale.fill_(4.0)
    ours = batch_classification_loss(query, target, scale, symmetric=symmetric)
    grads = torch.autograd.grad(ours, [query, target, scale])
    oracle = classification_oracle(query, target, scale, symmetric)
    expected = torch.autograd.grad(oracle, [query, target, scale])
    torch.testing.assert_close(ours, oracle)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    if batch == 1:
        assert ours.item() == pytest.approx(0.0, abs=1e-12)  # one class: nothing to classify
    else:
        assert grads[2].abs().item() > 0


def test_batch_classification_gather_is_local_without_a_process_group():
    query, target, scale = leaves((5, 7), (5, 7), ())
    for symmetric in (False, True):
        local = batch_classification_loss(query, target, scale, symmetric=symmetric)
        gathered = batch_classification_loss(query, target, scale, symmetric=symmetric, gather=True)
        assert local.item() == gathered.item()
    assert gather_with_grad(query) is query


def test_losses_compute_in_float32_from_bfloat16_and_under_autocast():
    query, target = leaves((6, 16), (6, 16), dtype=torch.float32)
    table = sample_soft_triplets(6, generator=torch.Generator().manual_seed(0))
    q16, t16 = query.detach().bfloat16().requires_grad_(), target.detach().bfloat16().requires_grad_()
    exact = soft_triplet_oracle(q16.double(), t16.double(), 4.0, table)
    low = soft_triplet_loss(q16, t16, scale=4.0, negatives=table)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(exact.item(), abs=1e-6)
    low.backward()
    assert q16.grad.dtype == torch.bfloat16
    scale = torch.tensor(4.0)
    exact = classification_oracle(q16.double(), t16.double(), 4.0, symmetric=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # A bf16 matmul upstream; the logits themselves stay float32.
        inside = batch_classification_loss(q16 @ torch.eye(16, dtype=torch.bfloat16), t16, scale,
                                           symmetric=True)
    assert inside.dtype == torch.float32 and inside.item() == pytest.approx(exact.item(), abs=1e-5)


def test_reconstruction_loss_is_elementwise_mean_squared_error():
    pred, target = leaves((4, 6), (4, 6))
    torch.testing.assert_close(reconstruction_loss(pred, target), ((pred - target) ** 2).mean())
    with pytest.raises(ValueError):
        reconstruction_loss(pred, target[:, :5])


# -- the cross-rank gather on a real process group -------------------------------------------------

WORLD = 2
PER_RANK = 4


def _gather_worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        # Every rank builds the same full batch; rank r owns rows [r B, (r + 1) B).
        rows_all = WORLD * PER_RANK
        full_q, full_t = [t.detach() for t in leaves((rows_all, 10), (rows_all, 10))]
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for symmetric in (False, True):
            # Single-process loss on the concatenated batch (gather=False ignores the group).
            q1, t1 = full_q.clone().requires_grad_(), full_t.clone().requires_grad_()
            s1 = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
            single = batch_classification_loss(q1, t1, s1, symmetric=symmetric)
            single.backward()
            # This rank's share, negatives gathered from both ranks.
            qr, tr = full_q[rows].clone().requires_grad_(), full_t[rows].clone().requires_grad_()
            sr = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
            local = batch_classification_loss(qr, tr, sr, symmetric=symmetric, gather=True)
            local.backward()
            # The single-process loss is the mean of the ranks' losses (each a mean over B rows).
            mean_loss = local.detach().clone()
            dist.all_reduce(mean_loss)
            torch.testing.assert_close(mean_loss / WORLD, single.detach())
            # Feature gradients: every rank's loss reaches this slice through the gather, so the
            # slice holds sum_r dL_r/dx = W * dL/dx; DDP's 1/W averaging then restores dL/dtheta.
            torch.testing.assert_close(qr.grad, WORLD * q1.grad[rows])
            torch.testing.assert_close(tr.grad, WORLD * t1.grad[rows])
            # The scale is a replicated parameter used locally: DDP's average is the single grad.
            scale_grad = sr.grad.clone()
            dist.all_reduce(scale_grad)
            torch.testing.assert_close(scale_grad / WORLD, s1.grad)

        # Uneven slices (2 and 3 rows): concatenated in rank order; backward sums every rank's
        # upstream gradient onto the owner's rows.
        sizes = [2, 3]
        full = torch.arange(5 * 3, dtype=torch.float64).view(5, 3)
        start = sum(sizes[:rank])
        mine = full[start : start + sizes[rank]].clone().requires_grad_()
        gathered = gather_with_grad(mine)
        torch.testing.assert_close(gathered, full)
        weights = (rank + 1) * torch.arange(15, dtype=torch.float64).view(5, 3)
        (gathered * weights).sum().backward()
        base = torch.arange(15, dtype=torch.float64).view(5, 3)
        expected = sum(r + 1 for r in range(WORLD)) * base
        torch.testing.assert_close(mine.grad, expected[start : start + sizes[rank]])
    finally:
        dist.destroy_process_group()


def test_gathered_classification_on_two_gloo_ranks_equals_single_process(tmp_path):
    mp.spawn(_gather_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
