"""Training losses: the base retrieval losses, ComposeAE's reconstruction term, and the one place
where features are gathered across DDP ranks.

What belongs here: pure PyTorch functions of embeddings (no Ray, no data plane, no modules with
state). The learnable normalisation scale lives in the model and is passed in.

Both base losses follow the official TIRG / ComposeAE code (`img_text_composition_models.py`,
`torch_functions.py`), whose `NormalizationLayer` maps a feature x to s * x / |x| with a learnable
s (initialised to 4) before *either* loss:

* batch-based classification: cross-entropy over (s q/|q|) (s t/|t|)^T with the diagonal as the
  labels, so the logits are s^2 cos(q, t) (an effective temperature of 1 / s^2);
* soft triplet: log(1 + exp(d_ij - d_ik)) on squared L2 distances between the scaled unit
  features, i.e. d = s^2 |u - v|^2, over the 2B embeddings [query; target].

The reconstruction term is torch.nn.MSELoss() with its default mean reduction, as ComposeAE's
`main.py` applies it to the decoded image and text features.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "batch_classification_loss",
    "gather_with_grad",
    "reconstruction_loss",
    "sample_soft_triplets",
    "soft_triplet_loss",
]


def _full_precision(x: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; other dtypes unchanged. The losses compute in full
    precision whatever autocast produced upstream; autograd casts the gradient back."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# -- gathering across ranks -----------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is absent or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient back to the slice's owner.

    Forward: each rank contributes x (n_r, ...) and receives the concatenation (sum n_r, ...).
    Backward: rank r's loss depends on every rank's slice (they are its negatives), so the
    gradient of slice r is the sum over ranks of d L_s / d x_r. One all_reduce(SUM) of the
    gathered gradient, then each rank keeps its own rows.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int) -> Tensor:
        width = max(sizes)
        # gloo and NCCL need equal shapes: pad to the largest slice, strip after.
        padding = (0, 0) * (x.dim() - 1) + (0, width - x.shape[0])
        padded = F.pad(x, padding) if x.shape[0] < width else x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        # A copy: the incoming gradient may be shared with other graph branches.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def _gather(x: Tensor) -> tuple[Tensor, int]:
    """Gather x (n, ...) from every rank with gradients; returns (gathered (N, ...), row offset of
    this rank's slice). A no-op (x, 0) without an initialised process group."""
    rank, world = _world()
    if world == 1:
        return x, 0
    # Slices may differ in length (a last partial batch); one tiny collective learns them.
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes_t = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size)
    sizes = [int(s.item()) for s in sizes_t]
    return _AllGather.apply(x, sizes, rank), sum(sizes[:rank])


def gather_with_grad(x: Tensor) -> Tensor:
    """all_gather x (n, ...) across ranks into (sum of n over ranks, ...), in rank order.

    The local slice keeps its gradient, and receives the gradient that every rank's loss sends
    to it (an all_reduce in backward). If each rank's loss L_r is a mean over its own B rows and
    the single-process loss on the concatenated batch is L = mean_r L_r, the gradient reaching
    this rank's x is W * dL/dx (W = world size); DDP's averaging of parameter gradients divides
    by W again, so training matches single-process training on the concatenated batch.
    Returns x unchanged when torch.distributed is not initialised.
    """
    return _gather(x)[0]


# -- batch-based classification ---------------------------------------------------------------


def batch_classification_loss(
    query: Tensor,
    target: Tensor,
    scale: Tensor | float,
    *,
    symmetric: bool = False,
    gather: bool = False,
) -> Tensor:
    """Cross-entropy of each query (B, D) against all targets (B, D), the matching one as label.

    logits = (scale * norm(query)) @ (scale * norm(target))^T = scale^2 * cosine, exactly as the
    official `compute_batch_based_classification_loss_` after `NormalizationLayer`; with the
    official initial scale 4 the softmax temperature is 1/16. `scale` is the model's learnable
    scalar (shape () or (1,)) and receives a gradient.

    symmetric: average the query->target loss with the target->query loss (the official code has
    only the first direction).
    gather: targets (and, when symmetric, queries) of every rank join the negatives; the labels
    are offset by this rank's position in the gathered batch and gradients flow back to the
    owners (see `gather_with_grad`). Each rank's loss is the mean over its own rows. Without an
    initialised process group this is the local loss.
    """
    if query.dim() != 2 or query.shape != target.shape:
        raise ValueError(f"query and target must both be (B, D); got {tuple(query.shape)} "
                         f"and {tuple(target.shape)}")
    # Logits in full precision even under bf16 autocast: s^2 = 16 magnifies bf16's rounding.
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = F.normalize(_full_precision(query), dim=1)  # (B, D)
        t = F.normalize(_full_precision(target), dim=1)  # (B, D)
        # Normalised features are gathered and scale^2 is applied once to the logits, so the
        # scale's gradient stays local to each rank (DDP averages it like any parameter).
        offset = 0
        q_all, t_all = q, t  # (N, D), N = B summed over ranks when gathering
        if gather and symmetric:
            # One collective for both sides: (B, 2D) -> (N, 2D).
            both, offset = _gather(torch.cat([q, t], dim=1))
            q_all, t_all = both.split(q.shape[1], dim=1)
        elif gather:
            t_all, offset = _gather(t)
        labels = torch.arange(q.shape[0], device=q.device) + offset  # (B,)
        logit_scale = scale * scale
        loss = F.cross_entropy(logit_scale * (q @ t_all.T), labels)  # logits (B, N)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logit_scale * (t @ q_all.T), labels))
    return loss


# -- soft triplet ---------------------------------------------------------------------------------


def sample_soft_triplets(
    batch_size: int,
    triplets_per_anchor: int = 3,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Negatives for the soft triplet loss over the 2B embeddings [query; target].

    Returns (2B, m) int64, m = min(triplets_per_anchor, 2B - 2): row i holds m distinct indices
    drawn uniformly without replacement from the 2B - 2 embeddings of the other pairs. Anchor i's
    positive is implicit: the other half of its pair, (i + B) mod 2B. The triplets are therefore
    (i, (i + B) mod 2B, negatives[i, c]). This is the distribution of the official sampler, which
    lists every (i, positive, k), shuffles the list and keeps the first 3.

    Sampling is Floyd's algorithm run for all anchors at once (m small vectorised steps, no loop
    over anchors); draws come from `generator` (on its device), so a seeded generator reproduces
    the table.
    """
    if batch_size < 2:
        raise ValueError(f"the soft triplet loss needs at least 2 pairs per batch; got {batch_size}")
    if triplets_per_anchor < 1:
        raise ValueError(f"triplets_per_anchor must be >= 1; got {triplets_per_anchor}")
    n = 2 * batch_size
    candidates = n - 2  # everything except the anchor and its positive
    m = min(triplets_per_anchor, candidates)
    on = generator.device if generator is not None else torch.device(device or "cpu")
    # Floyd: step t draws uniformly from [0, candidates - m + t]; a value already taken is
    # replaced by that upper bound, which no earlier step could draw. One rand call for all
    # steps, laid out (m, 2B) so each step's draws are one contiguous row.
    bounds = torch.arange(candidates - m + 1, candidates + 1, device=on)[:, None]  # (m, 1)
    draws = (torch.rand(m, n, generator=generator, device=on) * bounds).long()  # (m, 2B)
    picks = [draws[0]]
    for t in range(1, m):
        taken = draws[t] == picks[0]
        for earlier in picks[1:]:
            taken |= draws[t] == earlier
        picks.append(torch.where(taken, candidates - m + t, draws[t]))
    rank = torch.stack(picks, dim=1)  # (2B, m) positions among the candidates
    # Position r -> embedding index. Anchor i's pair occupies slots lo = i mod B and lo + B;
    # walking forward from lo + 1 (mod 2B) and hopping over lo + B visits the other 2B - 2.
    start = torch.arange(n, device=on)[:, None] % batch_size + 1  # (2B, 1)
    negatives = (start + rank + (rank >= batch_size - 1)) % n
    return negatives.to(device) if device is not None else negatives


def _sparse_rows(columns: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """A (N, size) CSR pattern holding, in row i, the m column indices columns[i] (N, m) (sorted
    ascending), with zero values."""
    n, m = columns.shape
    crow = torch.arange(0, n * m + 1, m, device=columns.device)
    values = torch.zeros(n * m, dtype=dtype, device=columns.device)
    with warnings.catch_warnings():
        # CSR construction warns once per process that CSR support is "beta"; here it is only
        # the pattern that sampled_addmm reads.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, columns.reshape(-1), values, (n, size),
                                       check_invariants=False)


class _SoftTriplet(torch.autograd.Function):
    """Soft triplet loss with a hand-written backward: one autograd node, no 2B x 2B matrix and
    no (2B, m, D) gathered copy.

    Rows of x = [query; target] (2B, D) are normalised to u. Because |s a - s b|^2 = 2 s^2 (1 - a.b)
    for unit a and b, d_ij - d_ik = 2 s^2 (u_i.u_k - u_i.u_j) =: z_ik, and the loss is
    mean softplus(z). The 2B m products u_i.u_k are a sampled matrix product (u u^T read only at
    the sampled pattern); the gradient w.r.t. u is a sparse-dense product (C + C^T) u, with C
    the (2B, 2B) matrix of dL/d(u_i.u_t).
    """

    @staticmethod
    def forward(ctx, query: Tensor, target: Tensor, scale: Tensor, negatives: Tensor,
                grad_factor: float) -> Tensor:
        batch = query.shape[0]
        u = torch.cat([query, target])  # (N, D), N = 2B
        inv_norm = u.norm(dim=1, keepdim=True).clamp_min_(1e-12).reciprocal_()  # (N, 1)
        u.mul_(inv_norm)  # unit rows, in place on the fresh concatenation
        n, m = negatives.shape
        pos = torch.linalg.vecdot(u[:batch], u[batch:])  # (B,): u_i.u_j, shared by both anchors
        # The loss does not depend on the order of an anchor's negatives; CSR wants them sorted.
        columns = negatives.sort(dim=1).values  # (N, m)
        pattern = _sparse_rows(columns, n, u.dtype)
        cos = torch.sparse.sampled_addmm(pattern, u, u.T, beta=0.0).values().view(n, m)
        gap = (cos.view(2, batch, m) - pos[:, None]).view(n, m)  # (N, m): u_i.u_k - u_i.u_j
        z = gap * (2 * scale * scale)
        ctx.save_for_backward(u, inv_norm, columns, gap, z, scale)
        ctx.grad_factor = grad_factor
        return F.softplus(z).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None, None]:
        # backward() may be called inside an autocast region; keep the products in full precision.
        with torch.autocast(device_type=grad.device.type, enabled=False):
            return *_SoftTriplet._backward(ctx, grad * ctx.grad_factor), None

    @staticmethod
    def _backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None]:
        u, inv_norm, columns, gap, z, scale = ctx.saved_tensors
        n, m = columns.shape
        batch = n // 2
        dz = torch.sigmoid(z).mul_(grad / z.numel())  # (N, m): dL/dz
        dneg = dz * (2 * scale * scale)  # (N, m): dL/d(u_i.u_k)
        # dL/d(u_i.u_j) = -sum_k dneg for each anchor; both anchors of a pair share the product.
        dpos = dneg.sum(dim=1).neg_()  # (N,)
        dpair = (dpos[:batch] + dpos[batch:]).unsqueeze(1)  # (B, 1)
        # d(a.b)/da = b and d(a.b)/db = a, so grad_u = (C + C^T) u. The negatives' part as one
        # sparse (N, N) @ (N, D) product (duplicate entries are summed) ...
        anchor = torch.arange(n, device=u.device).repeat_interleave(m)  # (N m,)
        flat = columns.reshape(-1)  # (N m,)
        weights = dneg.reshape(-1)
        coefficients = torch.sparse_coo_tensor(
            torch.stack([torch.cat([anchor, flat]), torch.cat([flat, anchor])]),
            torch.cat([weights, weights]), (n, n), check_invariants=False)
        grad_u = torch.sparse.mm(coefficients, u)  # (N, D)
        # ... and the pairs' part: rows p and p + B each receive dpair_p times the other.
        grad_u[:batch].addcmul_(dpair, u[batch:])
        grad_u[batch:].addcmul_(dpair, u[:batch])
        # Through u = x / |x|: remove the radial component, divide by |x|.
        radial = torch.linalg.vecdot(grad_u, u).unsqueeze(1)  # (N, 1)
        grad_x = grad_u.addcmul_(u, radial, value=-1).mul_(inv_norm)  # (N, D)
        grad_scale = None
        if ctx.needs_input_grad[2]:
            grad_scale = (dz * gap).sum() * (4 * scale)  # z = 2 s^2 gap, so dz/ds = 4 s gap
        return grad_x[:batch], grad_x[batch:], grad_scale, None


_GRADIENT_FACTORS = {"exact": 1.0, "official": 0.5}
"""`soft_triplet_loss(gradient=...)`: the factor on the true gradient."""


def soft_triplet_loss(
    query: Tensor,
    target: Tensor,
    *,
    triplets_per_anchor: int = 3,
    generator: torch.Generator | None = None,
    scale: Tensor | float = 1.0,
    negatives: Tensor | None = None,
    gradient: str = "exact",
) -> Tensor:
    """The official soft triplet loss on query (B, D) and target (B, D), vectorised.

    Over x = scale * norm([query; target]) (2B, D), for each anchor i, its positive j (the other
    half of its pair) and each sampled negative k:
        loss = mean over (i, j, k) of log(1 + exp(|x_i - x_j|^2 - |x_i - x_k|^2)).
    The official models apply `NormalizationLayer` (s x / |x|, learnable s initialised to 4)
    before this loss; pass that s as `scale` to reproduce them (the default 1 is the plain unit
    sphere). Inputs need not be normalised: the normalisation happens here.

    gradient: `exact` (the default) backpropagates the true gradient. The official legacy
    autograd Function's backward drops the factor 2 of d|a - b|^2 / da, so an official run
    trains with half of it; `official` reproduces that (every input's gradient, the scale's
    included, is halved: the official scale reached the loss through the features).

    negatives: a (2B, m) table as `sample_soft_triplets` returns; sampled with `generator`
    otherwise (m = min(triplets_per_anchor, 2B - 2)). B must be at least 2. Computed in float32
    (or float64) whatever the input precision; not twice differentiable.
    """
    if query.dim() != 2 or query.shape != target.shape:
        raise ValueError(f"query and target must both be (B, D); got {tuple(query.shape)} "
                         f"and {tuple(target.shape)}")
    if negatives is None:
        negatives = sample_soft_triplets(query.shape[0], triplets_per_anchor, generator=generator,
                                         device=query.device)
    elif negatives.dim() != 2 or negatives.shape[0] != 2 * query.shape[0]:
        raise ValueError(f"negatives must be a (2B, m) table with B = {query.shape[0]}; "
                         f"got {tuple(negatives.shape)}")
    if gradient not in _GRADIENT_FACTORS:
        raise ValueError(f"gradient must be one of {list(_GRADIENT_FACTORS)}; got {gradient!r}")
    query, target = _full_precision(query), _full_precision(target)
    scale_t = torch.as_tensor(scale, dtype=query.dtype, device=query.device)
    with torch.autocast(device_type=query.device.type, enabled=False):
        return _SoftTriplet.apply(query, target, scale_t, negatives.to(query.device),
                                  _GRADIENT_FACTORS[gradient])


# -- ComposeAE's autoencoder term ------------------------------------------------------------


def reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all elements (torch.nn.MSELoss() as ComposeAE's `main.py` uses it
    on the decoded image feature vs x and the decoded text feature vs q)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return F.mse_loss(pred, target)
