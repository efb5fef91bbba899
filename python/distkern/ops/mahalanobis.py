"""Mahalanobis distance: ``torch.ops.distkern.mahalanobis`` and its Python entry point."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._call import call
from ._fake import acc_dtype as _acc_dtype, same_device

__all__ = ["mahalanobis", "mahalanobis_k", "mahalanobis_pos", "gmm_log_likelihood", "nearest_reference",
           "reference_residual", "MinResult", "NearestResult"]


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor, *, lower: bool = True) -> torch.Tensor:
    r"""Squared Mahalanobis distance of each row of ``x`` to one Gaussian.

    .. math:: d^2_n = (x_n - \mu)^\top \Sigma^{-1} (x_n - \mu) = \lVert W^\top (x_n - \mu) \rVert^2,
              \qquad \Sigma^{-1} = W W^\top

    Args:
        x: ``(N, D)`` float32, float16, bfloat16 or float64, any strides.
        mean: ``(D,)`` the Gaussian's mean, any floating dtype.
        factor: the whitening factor ``W`` with ``Σ⁻¹ = W Wᵀ``. With ``lower=True`` (default) a
            lower-triangular ``(D, D)`` matrix ``L`` — the Cholesky factor of the precision, as
            :func:`distkern.gaussian.whitening_factor` returns it — and only its lower triangle
            is multiplied (about 40% fewer FLOPs at D = 256). On the CPU a non-zero strict upper
            triangle is refused; on CUDA it is ignored (checking would cost a host sync). With
            ``lower=False`` any ``(D, R)`` matrix, e.g. a truncated PCA whitening ``U diag(λ^-½)``.

    Returns:
        ``(N,)`` float32 (float64 for float64 ``x``): never negative (a sum of squares, computed
        in float32/float64 whatever the input dtype). A row with an inf or NaN coordinate gives
        NaN in its entry; no host sync is made to check for it.

    No ``(N, D)`` temporary is made: rows are processed in cache-sized tiles (CPU) or thread-block
    tiles (CUDA). Differentiable with respect to ``x`` and ``mean`` through a fused backward op;
    with respect to ``factor`` through a plain-PyTorch formula that does build ``(N, D)``
    temporaries (fitting the factor by gradient descent is rare).
    """
    return call(torch.ops.distkern.mahalanobis, x, mean, factor, lower)


@torch.library.register_fake("distkern::mahalanobis")
def _mahalanobis_fake(x, mean, factor, lower=True):
    torch._check(x.dim() == 2, lambda: f"distkern.mahalanobis: x must be a 2-D tensor of shape (N, D); got {tuple(x.shape)}")
    torch._check(mean.dim() == 1, lambda: f"distkern.mahalanobis: mean must be a 1-D tensor of shape (D,); got {tuple(mean.shape)}")
    torch._check(factor.dim() == 2, lambda: f"distkern.mahalanobis: factor must be a 2-D tensor; got {tuple(factor.shape)}")
    torch._check(mean.device == x.device and factor.device == x.device,
                 lambda: f"distkern.mahalanobis: x, mean and factor must be on one device; got {x.device}, {mean.device}, {factor.device}")
    return x.new_empty((x.shape[0],), dtype=_acc_dtype(x))


@torch.library.register_fake("distkern::mahalanobis_backward")
def _mahalanobis_backward_fake(grad, x, mean, factor, lower=True):
    same_device("distkern.mahalanobis_backward", grad=grad, x=x, mean=mean, factor=factor)
    return x.new_empty(x.shape), x.new_empty((x.shape[1],), dtype=_acc_dtype(x))


def _setup_context(ctx, inputs, output):
    x, mean, factor, lower = inputs
    ctx.save_for_backward(x, mean, factor)
    ctx.lower = lower


def _backward(ctx, grad):
    x, mean, factor = ctx.saved_tensors
    need_x, need_mean, need_factor = ctx.needs_input_grad[:3]
    grad_x = grad_mean = grad_factor = None
    if need_x or need_mean:
        gx, gm = torch.ops.distkern.mahalanobis_backward(grad, x, mean, factor, ctx.lower)
        grad_x = gx if need_x else None
        grad_mean = gm.to(mean.dtype) if need_mean else None
    if need_factor:
        acc = _acc_dtype(x)
        w = factor.to(acc)
        if ctx.lower:
            w = w.tril()
        xc = x.to(acc) - mean.to(acc)
        z = xc @ w
        grad_factor = (xc * (2 * grad.to(acc))[:, None]).T @ z
        if ctx.lower:
            grad_factor = grad_factor.tril()
        grad_factor = grad_factor.to(factor.dtype)
    return grad_x, grad_mean, grad_factor, None


torch.library.register_autograd("distkern::mahalanobis", _backward, setup_context=_setup_context)


# Second derivatives: the backward op (gx = 2·g·(x − μ)·W·Wᵀ, gm = −Σₙ gxₙ) differentiated as plain tensor
# algebra. With upstream (vx, vm), S = Σₙ 2·gₙ·uₙ·W·Wᵀ·(xₙ − μ)ᵀ for uₙ = vxₙ − vm, so
#   ∂S/∂g = 2·rowsum(u ⊙ (x − μ)WWᵀ),  ∂S/∂x = 2·g·uWWᵀ = −∂S/∂μ summed over rows,
#   ∂S/∂W = 2·[(g⊙u)ᵀ(x − μ)W + (g⊙(x − μ))ᵀuW]  (lower triangle when W is).
# Being torch operations, these differentiate again (third order and beyond).
def _mb_setup(ctx, inputs, output):
    grad, x, mean, factor, lower = inputs
    ctx.save_for_backward(grad, x, mean, factor)
    ctx.lower = lower


def _mb_backward(ctx, vx, vm):
    g, x, mean, factor = ctx.saved_tensors
    need_g, need_x, need_mean, need_factor = ctx.needs_input_grad[:4]
    acc = _acc_dtype(x)
    w = factor.to(acc)
    if ctx.lower:
        w = w.tril()
    u = vx.to(acc) if vx is not None else torch.zeros(x.shape, dtype=acc, device=x.device)
    if vm is not None:
        u = u - vm.to(acc)
    ga = g.to(acc)
    xc = x.to(acc) - mean.to(acc)
    out_g = out_x = out_mean = out_factor = None
    if need_g:
        out_g = (2 * (u * ((xc @ w) @ w.T)).sum(1)).to(g.dtype)
    if need_x or need_mean:
        dx = 2 * ga[:, None] * ((u @ w) @ w.T)
        out_x = dx.to(x.dtype) if need_x else None
        out_mean = (-dx.sum(0)).to(mean.dtype) if need_mean else None
    if need_factor:
        gw = 2 * ((ga[:, None] * u).T @ (xc @ w) + (ga[:, None] * xc).T @ (u @ w))
        out_factor = (gw.tril() if ctx.lower else gw).to(factor.dtype)
    return out_g, out_x, out_mean, out_factor, None


torch.library.register_autograd("distkern::mahalanobis_backward", _mb_backward, setup_context=_mb_setup)


# ---- K Gaussians ---------------------------------------------------------------------------------

class MinResult(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


def mahalanobis_k(x: torch.Tensor, means: torch.Tensor, factors: torch.Tensor, *, lower: bool = True,
                  reduce: str | None = None, bias: torch.Tensor | None = None):
    r"""Squared Mahalanobis distances of each row of ``x`` to K Gaussians, optionally reduced over K.

    .. math:: d^2_{nk} = \lVert W_k^\top (x_n - \mu_k) \rVert^2

    Args:
        x: ``(N, D)`` float32, float16, bfloat16 or float64, any strides.
        means: ``(K, D)`` component means.
        factors: one shared whitening factor ``(D, D)`` / ``(D, R)`` — a tied covariance, as in
            class-conditional Mahalanobis OOD (Lee et al.) — or one per component
            ``(K, D, D)`` / ``(K, D, R)`` (per-class Gaussians, GMMs). ``lower`` as in
            :func:`mahalanobis`.
        reduce: ``None`` → the ``(N, K)`` distances; ``"min"`` → ``MinResult(values (N,),
            indices (N,) int64)``, the nearest component; ``"logsumexp"`` →
            ``logsumexp_k(bias[k] − d²_{nk} / 2)`` ``(N,)``, a mixture log-likelihood when
            ``bias`` holds log-weights + log-normalisers (see :func:`gmm_log_likelihood`).
        bias: ``(K,)``, required for (and only for) ``reduce="logsumexp"``.

    Returns float32 (float64 for float64 ``x``). The reductions are fused: no ``(N, K)`` tensor
    is made for them, and no ``(N, K, D)`` tensor in any case. With a shared factor the distances
    cost one product by W plus an ``(N, R)·(R, K)`` product, evaluated as
    ``‖z‖² − 2 zᵀv_k + ‖v_k‖²`` around the mean of the means and clamped at 0 (absolute error
    about ``1e-7·(‖z‖² + ‖v_k‖²)`` in float32); per-component factors are evaluated directly.
    A row with an inf or NaN gives NaN (``min``: NaN value, any index).

    Differentiable with respect to ``x``, ``means`` and ``bias`` (the backward builds ``(N, D)``
    and ``(N, K)`` tensors, the size of the gradients); not with respect to ``factors``.
    """
    if reduce is None or reduce == "none":
        if bias is not None:
            raise ValueError("distkern.mahalanobis_k: bias is only used with reduce='logsumexp'")
        return call(torch.ops.distkern.mahalanobis_k, x, means, factors, lower)
    if reduce == "min":
        if bias is not None:
            raise ValueError("distkern.mahalanobis_k: bias is only used with reduce='logsumexp'")
        return MinResult(*call(torch.ops.distkern.mahalanobis_k_min, x, means, factors, lower))
    if reduce == "logsumexp":
        if bias is None:
            raise ValueError("distkern.mahalanobis_k: reduce='logsumexp' needs bias (K,), e.g. log mixture weights")
        return call(torch.ops.distkern.mahalanobis_k_logsumexp, x, means, factors, bias, lower)
    raise ValueError(f"distkern.mahalanobis_k: reduce must be None, 'min' or 'logsumexp'; got {reduce!r}")


def gmm_log_likelihood(x: torch.Tensor, means: torch.Tensor, factors: torch.Tensor,
                       log_weights: torch.Tensor | None = None) -> torch.Tensor:
    r"""Log-density of each row of ``x`` under a Gaussian mixture, in one fused pass.

    ``log p(x) = logsumexp_k(log w_k + Σ_i log L_k[i, i] − (D/2)·log 2π − d²_k(x)/2)`` with
    ``Σ_k⁻¹ = L_k L_kᵀ`` (lower-triangular factors, shared ``(D, D)`` or ``(K, D, D)``, e.g. from
    :func:`distkern.gaussian.whitening_factor`). ``log_weights`` ``(K,)`` defaults to uniform.
    Matches ``sklearn.mixture.GaussianMixture.score_samples`` on the same parameters.
    """
    if means.dim() != 2:
        raise ValueError(f"distkern.gmm_log_likelihood: means must be (K, D); got shape {tuple(means.shape)}")
    K, D = means.shape
    acc = _acc_dtype(x)
    if factors.dim() not in (2, 3) or factors.shape[-1] != factors.shape[-2]:
        raise ValueError("distkern.gmm_log_likelihood: factors must be lower-triangular (D, D) or (K, D, D); "
                         f"got shape {tuple(factors.shape)}")
    if factors.shape[-1] != D or (factors.dim() == 3 and factors.shape[0] != K):
        raise ValueError(f"distkern.gmm_log_likelihood: factors must be (D, D) or (K, D, D) = ({K}, {D}, {D}) for "
                         f"means of shape {tuple(means.shape)}; got {tuple(factors.shape)}")
    if log_weights is not None and tuple(log_weights.shape) != (K,):
        raise ValueError(f"distkern.gmm_log_likelihood: log_weights must be (K,) = ({K},); got "
                         f"{tuple(log_weights.shape)}")
    # ½ log det Σ⁻¹ = Σ log |L_ii|: a factor with a sign-flipped column is as valid as the Cholesky one
    logdet = torch.log(torch.diagonal(factors.to(acc), dim1=-2, dim2=-1).abs()).sum(-1)
    if logdet.dim() == 0:
        logdet = logdet.expand(K)
    if log_weights is None:
        log_weights = torch.full((K,), -math.log(K), dtype=acc, device=x.device)
    bias = log_weights.to(acc) + logdet - 0.5 * D * math.log(2 * math.pi)
    return call(torch.ops.distkern.mahalanobis_k_logsumexp, x, means, factors, bias, True)


@torch.library.register_fake("distkern::mahalanobis_k")
def _k_fake(x, means, factors, lower=True):
    same_device("distkern.mahalanobis_k", x=x, means=means, factors=factors)
    torch._check(x.dim() == 2 and means.dim() == 2, lambda: "distkern.mahalanobis_k: x must be (N, D) and means (K, D)")
    return x.new_empty((x.shape[0], means.shape[0]), dtype=_acc_dtype(x))


@torch.library.register_fake("distkern::mahalanobis_k_min")
def _k_min_fake(x, means, factors, lower=True):
    same_device("distkern.mahalanobis_k_min", x=x, means=means, factors=factors)
    torch._check(x.dim() == 2 and means.dim() == 2, lambda: "distkern.mahalanobis_k_min: x must be (N, D) and means (K, D)")
    return x.new_empty((x.shape[0],), dtype=_acc_dtype(x)), x.new_empty((x.shape[0],), dtype=torch.int64)


@torch.library.register_fake("distkern::mahalanobis_k_logsumexp")
def _k_lse_fake(x, means, factors, bias, lower=True):
    same_device("distkern.mahalanobis_k_logsumexp", x=x, means=means, factors=factors, bias=bias)
    torch._check(x.dim() == 2 and means.dim() == 2, lambda: "distkern.mahalanobis_k_logsumexp: x must be (N, D) and means (K, D)")
    return x.new_empty((x.shape[0],), dtype=_acc_dtype(x))


def _k_grads(G, x, means, factors, lower, need_x, need_means):
    """∂/∂x and ∂/∂means of Σ_{nk} G_nk d²_nk, G (N, K) in the accumulation dtype."""
    acc = G.dtype
    grad_x = grad_means = None
    if factors.dim() == 2:
        w = factors.to(acc)
        if lower:
            w = w.tril()
        mu = means.to(acc)
        c = mu.mean(0)
        xc, mc = x.to(acc) - c, mu - c

        def prec(t):  # t Σ⁻¹ = (t W) Wᵀ
            return (t @ w) @ w.T

        if need_x:
            grad_x = (2 * prec(G.sum(1, keepdim=True) * xc - G @ mc)).to(x.dtype)
        if need_means:
            grad_means = (-2 * prec(G.T @ xc - G.sum(0)[:, None] * mc)).to(means.dtype)
        return grad_x, grad_means
    gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    gm = torch.empty(means.shape, dtype=acc, device=x.device) if need_means else None
    for k in range(means.shape[0]):
        a, b = torch.ops.distkern.mahalanobis_backward(G[:, k], x, means[k], factors[k], lower)
        if need_x:
            gx += a.to(acc)
        if need_means:
            gm[k] = b
    return (gx.to(x.dtype) if need_x else None), (gm.to(means.dtype) if need_means else None)


def _no_factor_grad(ctx, name):
    if ctx.needs_input_grad[2]:
        raise RuntimeError(f"distkern.{name}: gradients with respect to factors are not implemented; "
                           "pass factors.detach() (x, means and bias are differentiable)")


def _k_setup(ctx, inputs, output):
    x, means, factors, lower = inputs
    ctx.save_for_backward(x, means, factors)
    ctx.lower = lower


def _k_backward(ctx, grad):
    _no_factor_grad(ctx, "mahalanobis_k")
    x, means, factors = ctx.saved_tensors
    gx, gm = _k_grads(grad.to(_acc_dtype(x)), x, means, factors, ctx.lower, *ctx.needs_input_grad[:2])
    return gx, gm, None, None


def _k_min_setup(ctx, inputs, output):
    x, means, factors, lower = inputs
    ctx.save_for_backward(x, means, factors, output[1])
    ctx.lower = lower


def _k_min_backward(ctx, grad_values, grad_indices):
    _no_factor_grad(ctx, "mahalanobis_k_min")
    x, means, factors, idx = ctx.saved_tensors
    acc = _acc_dtype(x)
    g = torch.where(idx >= 0, grad_values.to(acc), 0.0)  # idx < 0 only when every distance is inf/NaN
    G = torch.zeros((x.shape[0], means.shape[0]), dtype=acc, device=x.device).scatter_(1, idx.clamp_min(0)[:, None], g[:, None])
    gx, gm = _k_grads(G, x, means, factors, ctx.lower, *ctx.needs_input_grad[:2])
    return gx, gm, None, None


def _k_lse_setup(ctx, inputs, output):
    x, means, factors, bias, lower = inputs
    ctx.save_for_backward(x, means, factors, bias)
    ctx.lower = lower


def _k_lse_backward(ctx, grad):
    _no_factor_grad(ctx, "mahalanobis_k_logsumexp")
    x, means, factors, bias = ctx.saved_tensors
    acc = _acc_dtype(x)
    d2 = torch.ops.distkern.mahalanobis_k(x, means, factors, ctx.lower)
    w = torch.softmax(bias.to(acc) - 0.5 * d2, dim=1) * grad.to(acc)[:, None]  # ∂/∂bias per row
    gx, gm = _k_grads(-0.5 * w, x, means, factors, ctx.lower, *ctx.needs_input_grad[:2])
    gb = w.sum(0).to(bias.dtype) if ctx.needs_input_grad[3] else None
    return gx, gm, None, gb, None


torch.library.register_autograd("distkern::mahalanobis_k", _k_backward, setup_context=_k_setup)
torch.library.register_autograd("distkern::mahalanobis_k_min", _k_min_backward, setup_context=_k_min_setup)
torch.library.register_autograd("distkern::mahalanobis_k_logsumexp", _k_lse_backward, setup_context=_k_lse_setup)


# ---- per-position Gaussians (PaDiM) ------------------------------------------------------------

def mahalanobis_pos(x: torch.Tensor, means: torch.Tensor, factors: torch.Tensor, *, lower: bool = True) -> torch.Tensor:
    r"""Squared Mahalanobis distance of each feature vector to the Gaussian of its own position.

    .. math:: d^2_{bp} = \lVert W_p^\top (x_{bp} - \mu_p) \rVert^2

    The PaDiM scoring step: one Gaussian per spatial position ``p`` of a feature map
    (``P = H·W``).

    Args:
        x: ``(B, P, D)`` features, any strides (anomalib's ``(B, D, H, W)`` embedding is
            ``emb.flatten(2).transpose(1, 2)``, a view; a contiguous D is read fastest).
        means: ``(P, D)``.
        factors: ``(P, D, D)`` lower-triangular factors of the precisions (``lower=True``) or
            ``(P, D, R)`` whitening matrices, **contiguous**, in float32, float16 or bfloat16
            (float64 only with float64 ``x``). They are read in place and never copied or
            converted as a whole: at PaDiM's sizes (P = 3136, D = 550) they are 3.8 GB in fp32,
            1.9 GB in bf16; each is read once per call whatever B is. Arithmetic is in float32.
            With ``lower=True`` the strict upper triangle must be zero (as
            :func:`~distkern.gaussian.whitening_factor` leaves it): the CPU refuses it otherwise; on
            CUDA it is not checked (that would read all P factors once more), and float32 factors at
            D ≥ 512 and B ≥ 16, whose products cuBLAS forms by column blocks that include the
            diagonal blocks whole, would multiply it.

    Returns:
        ``(B, P)`` float32 (float64 for float64 ``x``), never negative; NaN for a row with an
        inf / NaN.

    Differentiable with respect to ``x`` and ``means`` (the backward works position by position
    in batched products and converts the factors to the accumulation dtype).
    """
    return call(torch.ops.distkern.mahalanobis_pos, x, means, factors, lower)


@torch.library.register_fake("distkern::mahalanobis_pos")
def _pos_fake(x, means, factors, lower=True):
    same_device("distkern.mahalanobis_pos", x=x, means=means, factors=factors)
    torch._check(x.dim() == 3, lambda: f"distkern.mahalanobis_pos: x must be (B, P, D); got {tuple(x.shape)}")
    return x.new_empty((x.shape[0], x.shape[1]), dtype=_acc_dtype(x))


def _pos_setup(ctx, inputs, output):
    x, means, factors, lower = inputs
    ctx.save_for_backward(x, means, factors)
    ctx.lower = lower


def _pos_backward(ctx, grad):
    _no_factor_grad(ctx, "mahalanobis_pos")
    x, means, factors = ctx.saved_tensors
    acc = _acc_dtype(x)
    w = factors.to(acc)
    if ctx.lower:
        w = w.tril()
    xc = (x.to(acc) - means.to(acc)).transpose(0, 1)  # (P, B, D)
    z = torch.bmm(xc, w) * (2 * grad.to(acc)).T[:, :, None]  # (P, B, R)
    gx = torch.bmm(z, w.transpose(1, 2)).transpose(0, 1)  # (B, P, D)
    grad_x = gx.to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_means = (-gx.sum(0)).to(means.dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_means, None, None


torch.library.register_autograd("distkern::mahalanobis_pos", _pos_backward, setup_context=_pos_setup)


# ---- nearest reference by cosine similarity (ResAD) ------------------------------------------

class NearestResult(NamedTuple):
    similarity: torch.Tensor
    indices: torch.Tensor


def nearest_reference(x: torch.Tensor, refs: torch.Tensor) -> NearestResult:
    r"""For each row of ``x``, the reference with the highest cosine similarity.

    ResAD's matching step (each feature matched to its nearest normal reference feature), in
    tiles: the ``(N, M)`` similarity matrix is never stored (the reference code builds it and runs
    out of memory at realistic sizes).

    Args:
        x: ``(N, D)`` float32 / float16 / bfloat16 / float64, any strides.
        refs: ``(M, D)`` reference features (normalised inside, like
            ``torch.nn.functional.normalize`` with ``eps=1e-12``).

    Returns:
        ``NearestResult(similarity (N,) float32 (float64 for float64 x), indices (N,) int64)``;
        ties keep the lowest index; a row with an inf / NaN gets NaN similarity (its index is
        meaningless). ``similarity`` is differentiable with respect to ``x`` and ``refs``.
    """
    # Checked here as well as in the op: on an H100 (2026-11-27) the CUDA op crashed the process
    # when it refused a D mismatch (see the note in benchmarks/README.md); checking before the
    # dispatch keeps distkern.nearest_reference's errors clean until that is understood.
    if x.dim() != 2 or refs.dim() != 2:
        raise ValueError(f"distkern.nearest_cosine: x must be (N, D) and refs (M, D); got shapes {tuple(x.shape)} and {tuple(refs.shape)}")
    if refs.shape[1] != x.shape[1]:
        raise ValueError(f"distkern.nearest_cosine: refs must be (M, D) with D = {x.shape[1]} to match x of shape "
                         f"{list(x.shape)}; got shape {list(refs.shape)}")
    if refs.shape[0] == 0:
        raise ValueError("distkern.nearest_cosine: refs must hold at least one reference (M > 0)")
    return NearestResult(*call(torch.ops.distkern.nearest_cosine, x, refs))


def reference_residual(x: torch.Tensor, refs: torch.Tensor, *, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ResAD's residual features: ``x − refs[nearest]`` (or its square, as in ResAD's WRN50 path),
    ``(N, D)`` in x's dtype, and the matched indices ``(N,)``. Differentiable w.r.t. ``x`` and ``refs``."""
    idx = nearest_reference(x.detach(), refs.detach()).indices
    r = x - refs.to(x.dtype)[idx]
    return (r * r if squared else r), idx


@torch.library.register_fake("distkern::nearest_cosine")
def _nearest_fake(x, refs):
    same_device("distkern.nearest_cosine", x=x, refs=refs)
    torch._check(x.dim() == 2 and refs.dim() == 2, lambda: "distkern.nearest_cosine: x must be (N, D) and refs (M, D)")
    return x.new_empty((x.shape[0],), dtype=_acc_dtype(x)), x.new_empty((x.shape[0],), dtype=torch.int64)


def _nearest_setup(ctx, inputs, output):
    x, refs = inputs
    ctx.save_for_backward(x, refs, output[0], output[1])


def _nearest_backward(ctx, grad_sim, grad_idx):
    x, refs, sim, idx = ctx.saved_tensors
    acc = _acc_dtype(x)
    xa, ra = x.to(acc), refs.to(acc)
    xr = torch.linalg.vector_norm(xa, dim=1, keepdim=True)
    r = ra[idx]
    rr = torch.linalg.vector_norm(r, dim=1, keepdim=True)
    xn, rn = xr.clamp_min(1e-12), rr.clamp_min(1e-12)
    # below the clamp the norm is the constant 1e-12: its derivative term vanishes (as F.normalize's)
    sx, sr = (xr >= 1e-12).to(acc), (rr >= 1e-12).to(acc)
    g = grad_sim.to(acc)[:, None]
    s = sim.to(acc)[:, None]
    grad_x = grad_refs = None
    if ctx.needs_input_grad[0]:  # ∂cos/∂x = r̂/‖x‖ − cos·x/‖x‖²
        grad_x = (g * (r / rn / xn - sx * s * xa / (xn * xn))).to(x.dtype)
    if ctx.needs_input_grad[1]:  # ∂cos/∂r = x̂/‖r‖ − cos·r/‖r‖², summed over the rows matched to r
        contrib = g * (xa / xn / rn - sr * s * r / (rn * rn))
        grad_refs = torch.zeros_like(ra).index_add_(0, idx, contrib).to(refs.dtype)
    return grad_x, grad_refs


torch.library.register_autograd("distkern::nearest_cosine", _nearest_backward, setup_context=_nearest_setup)
