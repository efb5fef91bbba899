"""Expectation-maximisation for Gaussian mixtures on the features' device, with scikit-learn's semantics.

:func:`fit_gmm` follows ``sklearn.mixture.GaussianMixture`` step for step, so that started from
the same parameters both give the same fit (to rounding):

* **Initialisation** (``init``): ``"kmeans"`` (default, as sklearn's default ``init_params``):
  k-means++ seeding then Lloyd iterations, hard responsibilities from the final labels;
  ``"k-means++"``: the k-means++ seeds alone, one point per component (sklearn's
  ``init_params="k-means++"``); ``"random_from_data"``: K distinct random points. Weights,
  means and covariances are then estimated from those responsibilities (initial weights
  ``n_k / N``). ``weights_init`` / ``means_init`` / ``precisions_init`` replace the
  corresponding estimate (as sklearn's arguments of those names); ``resp_init`` gives the
  responsibilities directly. Random draws come from a CPU ``torch.Generator`` seeded with
  ``seed``: the same seed gives the same fit, on any device.
* **E-step**: squared Mahalanobis distances ``(N, K)`` by :func:`distkern.mahalanobis_k` with
  the lower-triangular precision factors ``Σ_k⁻¹ = L_k L_kᵀ``, plus ``Σ_i log L_k[i, i]`` (half
  the log-determinant of the precision), ``log w_k`` and ``−(D/2)·log 2π``; log-sum-exp
  normalisation gives the log-responsibilities and ``log p(x_n)``.
* **M-step** in float64: ``n_k = Σ_n r_nk + 10·eps``, ``μ_k = Σ_n r_nk x_n / n_k``,
  ``Σ_k = Σ_n r_nk (x_n − μ_k)(x_n − μ_k)ᵀ / n_k + reg_covar·I``, ``w_k = n_k / Σ_j n_j``.
* **Convergence**: the lower bound is the mean log-likelihood ``mean_n log p(x_n)`` of the
  parameters entering the iteration (computed in its E-step); EM stops when it changes by less
  than ``tol`` between iterations (sklearn's ``tol``). Of ``n_init`` runs the one with the
  largest final lower bound is kept; when it did not converge a
  :class:`GMMConvergenceWarning` is issued (sklearn: ``ConvergenceWarning``).

Everything runs in float64 on ``x``'s device; host synchronisations are a few per EM iteration
(the convergence test and the checks of :func:`distkern.gaussian.whitening_factor`) and a few
per Lloyd iteration of the initialisation.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional, Union

import torch

import distkern
from distkern.gaussian import NotPositiveDefiniteError, whitening_factor

__all__ = ["COVARIANCE_TYPES", "INITS", "GMMConvergenceWarning", "GMMFit", "fit_gmm", "kmeans_plusplus"]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
INITS = ("kmeans", "k-means++", "random_from_data")
_LOG_2PI = math.log(2.0 * math.pi)
_NK_EPS = 10.0 * torch.finfo(torch.float64).eps  # sklearn adds 10·eps to n_k (empty components)

Seed = Union[int, torch.Generator, None]


class GMMConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the lower bound changed by less than ``tol``."""


def _generator(seed: Seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


@dataclass
class GMMFit:
    """A fitted Gaussian mixture (float64 tensors on the data's device).

    Attributes:
        weights: ``(K,)`` mixture weights, summing to 1.
        means: ``(K, D)`` component means.
        covariances: as sklearn's ``covariances_``: ``(K, D, D)`` (full), ``(D, D)`` (tied),
            ``(K, D)`` (diag) or ``(K,)`` (spherical); ``reg_covar`` included.
        factors: lower-triangular precision factors, ``Σ_k⁻¹ = L_k L_kᵀ``, ready for
            :func:`distkern.mahalanobis_k` / :func:`distkern.gmm_log_likelihood`: ``(K, D, D)``
            (full; diagonal matrices for diag and spherical) or one shared ``(D, D)`` (tied).
        covariance_type: one of :data:`COVARIANCE_TYPES`.
        converged: whether the kept run converged (``|Δ lower bound| < tol``).
        n_iter: EM iterations of the kept run.
        lower_bound: its final lower bound (mean log-likelihood of the training data under the
            parameters entering the last iteration, as sklearn's ``lower_bound_``).
        lower_bounds: the lower bound at each iteration of the kept run.
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    factors: torch.Tensor
    covariance_type: str = "full"
    converged: bool = False
    n_iter: int = 0
    lower_bound: float = -math.inf
    lower_bounds: list = field(default_factory=list)

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])

    @property
    def precisions(self) -> torch.Tensor:
        """Precisions in sklearn's ``precisions_`` shapes (``(K, D, D)``, ``(D, D)``, ``(K, D)``, ``(K,)``)."""
        L = self.factors
        if self.covariance_type in ("full", "tied"):
            return L @ L.transpose(-1, -2)
        diag = torch.diagonal(L, dim1=-2, dim2=-1) ** 2
        return diag if self.covariance_type == "diag" else diag[:, 0]

    def _params(self, x: torch.Tensor):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        dev = x.device
        return self.means.to(dev, dt), self.factors.to(dev, dt), self.weights.to(dev, torch.float64).log().to(dt)

    def score_samples(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` log-density of each row of ``x`` ``(N, D)`` (one fused
        :func:`distkern.gmm_log_likelihood` pass); float64 for float64 ``x``, else float32."""
        m, L, lw = self._params(x)
        return distkern.gmm_log_likelihood(x, m, L, lw)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` int64: the component of highest posterior responsibility for each row."""
        m, L, lw = self._params(x)
        logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        return (lw + logdet - 0.5 * distkern.mahalanobis_k(x, m, L)).argmax(1)

    def to(self, device) -> "GMMFit":
        """A copy with every tensor on ``device``."""
        return replace(self, weights=self.weights.to(device), means=self.means.to(device),
                       covariances=self.covariances.to(device), factors=self.factors.to(device))


# ---- k-means++ / Lloyd ---------------------------------------------------------------------------

def _sqdist(xc: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """(N, M) squared Euclidean distances, ‖x‖² − 2x·c + ‖c‖² clamped at 0 (x, c pre-centred)."""
    return (x_sq[:, None] - 2.0 * (xc @ c.T) + (c * c).sum(1)[None, :]).clamp_min_(0)


def kmeans_plusplus(x: torch.Tensor, n_clusters: int, *, seed: Seed = 0,
                    n_local_trials: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; sklearn's ``kmeans_plusplus``).

    The first centre is a uniformly random row; each next one is the best, by resulting
    potential (sum of squared distances to the nearest centre), of ``n_local_trials``
    (default ``2 + ⌊log K⌋``) rows drawn with probability proportional to their squared distance
    to the nearest centre so far.

    Args:
        x: ``(N, D)`` floating data, ``N ≥ n_clusters``.
        n_clusters: K.
        seed: an int, a ``torch.Generator`` (its state advances) or ``None`` (fresh entropy).

    Returns:
        ``(centers (K, D), indices (K,) int64)``, on ``x``'s device: ``centers = x[indices]``.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"kmeans_plusplus: x must be a floating (N, D) tensor; got {x.dtype} {tuple(x.shape)}")
    N = x.shape[0]
    if not 1 <= n_clusters <= N:
        raise ValueError(f"kmeans_plusplus: n_clusters must lie in [1, N={N}]; got {n_clusters}")
    g = _generator(seed)
    trials = 2 + int(math.log(n_clusters)) if n_local_trials is None else int(n_local_trials)
    xc = x - x.mean(0)
    x_sq = (xc * xc).sum(1)
    first = torch.randint(N, (1,), generator=g, device=g.device).to(x.device)
    chosen = [first[0]]
    closest = _sqdist(xc, xc[first], x_sq)[:, 0]
    pot = closest.sum()
    for _ in range(1, n_clusters):
        r = torch.rand(trials, generator=g, device=g.device, dtype=torch.float64).to(x.device, x.dtype) * pot
        cand = torch.searchsorted(torch.cumsum(closest, 0), r).clamp_(max=N - 1)
        d = torch.minimum(closest[:, None], _sqdist(xc, xc[cand], x_sq))  # (N, trials)
        pots = d.sum(0)
        best = pots.argmin()
        pot, closest = pots[best], d[:, best]
        chosen.append(cand[best])
    idx = torch.stack(chosen)
    return x[idx], idx


def _kmeans_labels(x: torch.Tensor, k: int, g: torch.Generator, max_iter: int = 300, tol: float = 1e-4) -> torch.Tensor:
    """Lloyd's k-means from k-means++ seeds (sklearn ``KMeans(n_init=1)``'s defaults); (N,) labels."""
    _, idx = kmeans_plusplus(x, k, seed=g)
    xc = x - x.mean(0)
    x_sq = (xc * xc).sum(1)
    centers = xc[idx]
    tol_abs = tol * float(xc.var(0, unbiased=False).mean())
    labels_old = None
    for _ in range(max_iter):
        d = _sqdist(xc, centers, x_sq)
        labels = d.argmin(1)
        if labels_old is not None and torch.equal(labels, labels_old):
            return labels  # strict convergence: centres are the means of these labels
        counts = torch.bincount(labels, minlength=k)
        new = torch.zeros_like(centers).index_add_(0, labels, xc) / counts.clamp_min(1)[:, None].to(xc.dtype)
        empty = counts == 0
        n_empty = int(empty.sum())
        if n_empty:  # relocate empty clusters to the points farthest from their centres (as sklearn)
            far = d.gather(1, labels[:, None])[:, 0].topk(n_empty).indices
            new[empty] = xc[far]
        shift = float(((new - centers) ** 2).sum())
        centers, labels_old = new, labels
        if shift <= tol_abs:
            break
    return _sqdist(xc, centers, x_sq).argmin(1)


# ---- M-step pieces -------------------------------------------------------------------------------

_CHUNK = 1 << 22  # elements of a (K, rows, D) float64 temporary in the M-step (32 MiB)


def _estimate(X: torch.Tensor, resp: torch.Tensor, cov_type: str, reg_covar: float):
    """sklearn's ``_estimate_gaussian_parameters`` (centred covariances): n_k, means, covariances.

    Batched over components: the centred rows of all K components go through one batched
    product per chunk of rows, each chunk's ``(K, rows, D)`` temporaries bounded by ``_CHUNK``.
    """
    nk = resp.sum(0) + _NK_EPS
    means = (resp.T @ X) / nk[:, None]
    N, D = X.shape
    K = means.shape[0]
    full = cov_type in ("full", "tied")
    acc = torch.zeros((K, D, D) if full else (K, D), dtype=X.dtype, device=X.device)
    step = max(1, _CHUNK // (K * D))
    for s in range(0, N, step):
        diff = X[None, s:s + step] - means[:, None]  # (K, rows, D)
        rdiff = diff * resp[s:s + step].T[:, :, None]
        if full:
            acc.baddbmm_(rdiff.transpose(1, 2), diff)
        else:
            acc += (rdiff * diff).sum(1)
    if cov_type == "full":
        covs = acc / nk[:, None, None]
    elif cov_type == "tied":
        covs = acc.sum(0) / nk.sum()
    else:
        covs = acc / nk[:, None]
    if full:
        covs.diagonal(dim1=-2, dim2=-1).add_(reg_covar)
    else:
        covs += reg_covar
        if cov_type == "spherical":
            covs = covs.mean(1)
    return nk, means, covs


_ILL_DEFINED = ("Fitting the mixture model failed because some components have ill-defined empirical "
                "covariance (for instance caused by singleton or collapsed samples). Try to decrease the "
                "number of components, increase reg_covar, or scale the input data.")


def _factors_from_covariances(covs: torch.Tensor, cov_type: str, D: int) -> torch.Tensor:
    if cov_type in ("full", "tied"):
        try:
            return whitening_factor(covs, dtype=None)
        except NotPositiveDefiniteError as e:
            where = f"component {e.index[0]}" if e.index else "the tied covariance"
            raise NotPositiveDefiniteError(f"fit_gmm: {where}: smallest eigenvalue {e.min_eigenvalue:.6g}. {_ILL_DEFINED}",
                                           index=e.index, min_eigenvalue=e.min_eigenvalue) from None
    bad = ~(covs > 0)
    if bool(bad.any()):
        k = int(torch.nonzero(bad.reshape(bad.shape[0], -1).any(1))[0, 0])
        raise NotPositiveDefiniteError(f"fit_gmm: component {k} has a non-positive variance. {_ILL_DEFINED}",
                                       index=(k,), min_eigenvalue=float(covs[k].min()))
    inv_sd = covs.rsqrt()
    if cov_type == "spherical":
        inv_sd = inv_sd[:, None].expand(-1, D)
    return torch.diag_embed(inv_sd)


def _factors_from_precisions(P: torch.Tensor, cov_type: str, K: int, D: int) -> torch.Tensor:
    if cov_type in ("full", "tied"):
        L, info = torch.linalg.cholesky_ex(0.5 * (P + P.transpose(-1, -2)))
        if bool((info > 0).any()):
            raise ValueError("fit_gmm: precisions_init must be symmetric positive definite")
        return L
    if not bool((P > 0).all()):
        raise ValueError("fit_gmm: precisions_init must be positive")
    sd = P.sqrt()
    return torch.diag_embed(sd if cov_type == "diag" else sd[:, None].expand(K, D))


def _covariances_from_factors(L: torch.Tensor, cov_type: str) -> torch.Tensor:
    if cov_type in ("full", "tied"):
        return torch.cholesky_inverse(L)
    var = torch.diagonal(L, dim1=-2, dim2=-1) ** -2
    return var if cov_type == "diag" else var[:, 0]


def _log_det_half(L: torch.Tensor, K: int) -> torch.Tensor:
    """Σ_i log L[i, i] = ½ log det Σ⁻¹, (K,)."""
    ld = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return ld.expand(K) if ld.dim() == 0 else ld


def _e_step(X: torch.Tensor, means: torch.Tensor, factors: torch.Tensor, weights: torch.Tensor):
    K, D = means.shape
    d2 = distkern.mahalanobis_k(X, means, factors)  # (N, K) float64
    wlp = (weights.log() + _log_det_half(factors, K) - 0.5 * D * _LOG_2PI) - 0.5 * d2
    lpn = torch.logsumexp(wlp, 1)
    return lpn.mean(), wlp - lpn[:, None]


# ---- the fit -------------------------------------------------------------------------------------

def _as64(t, name: str, shape: tuple, device) -> torch.Tensor:
    t = torch.as_tensor(t).to(device=device, dtype=torch.float64)
    if tuple(t.shape) != shape:
        raise ValueError(f"fit_gmm: {name} must have shape {shape}; got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"fit_gmm: {name} has inf or NaN entries")
    return t


def _init_resp(X: torch.Tensor, K: int, init: str, g: torch.Generator) -> torch.Tensor:
    N = X.shape[0]
    resp = torch.zeros((N, K), dtype=X.dtype, device=X.device)
    if init == "kmeans":
        resp[torch.arange(N, device=X.device), _kmeans_labels(X, K, g)] = 1.0
    elif init == "k-means++":
        _, idx = kmeans_plusplus(X, K, seed=g)
        resp[idx, torch.arange(K, device=X.device)] = 1.0
    else:  # random_from_data
        idx = torch.randperm(N, generator=g, device=g.device)[:K].to(X.device)
        resp[idx, torch.arange(K, device=X.device)] = 1.0
    return resp


def fit_gmm(x: torch.Tensor, n_components: int, *, covariance_type: str = "full", reg_covar: float = 1e-6,
            max_iter: int = 100, tol: float = 1e-3, n_init: int = 1, seed: Seed = 0, init: str = "kmeans",
            weights_init=None, means_init=None, precisions_init=None, resp_init=None,
            warn: bool = True) -> GMMFit:
    """Fit a K-component Gaussian mixture to ``x`` by EM, on ``x``'s device, in float64.

    Args:
        x: ``(N, D)`` floating features (any device), ``N ≥ max(2, n_components)``, finite.
        n_components: K ≥ 1.
        covariance_type: ``"full"`` (default), ``"tied"``, ``"diag"`` or ``"spherical"`` (as sklearn).
        reg_covar: ``≥ 0``, added to the diagonal of each covariance (sklearn's convention).
        max_iter: EM iterations per run (``0``: return the initial parameters).
        tol: convergence threshold on the change of the lower bound (mean log-likelihood).
        n_init: runs from independent initialisations; the largest final lower bound is kept.
        seed: int, ``torch.Generator`` or ``None``; drives every random draw of the
            initialisation. Same seed, same data, same device → identical result.
        init: ``"kmeans"``, ``"k-means++"`` or ``"random_from_data"`` (see the module doc).
        weights_init, means_init, precisions_init: ``(K,)``, ``(K, D)`` and precisions in
            sklearn's shapes (``(K, D, D)`` full, ``(D, D)`` tied, ``(K, D)`` diag, ``(K,)``
            spherical); each replaces the estimate from the initial responsibilities, as
            sklearn's arguments of the same names. With all three given no random
            initialisation is made (and ``n_init`` runs would be identical: one is made).
        resp_init: ``(N, K)`` initial responsibilities (rows summing to 1); replaces ``init``.
        warn: issue a :class:`GMMConvergenceWarning` when the kept run did not converge.

    Returns:
        :class:`GMMFit` (float64 tensors on ``x``'s device).

    Raises:
        ValueError: bad shapes or arguments, non-finite ``x`` (the rows are named), too few samples.
        distkern.gaussian.NotPositiveDefiniteError: a component's covariance cannot be factorised
            (collapsed component with ``reg_covar`` 0 or too small); names the component.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError("fit_gmm: x must be a floating (N, D) tensor; got "
                         + (f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"fit_gmm: covariance_type must be one of {COVARIANCE_TYPES}; got {covariance_type!r}")
    if init not in INITS:
        raise ValueError(f"fit_gmm: init must be one of {INITS}; got {init!r}")
    K = int(n_components)
    if K < 1:
        raise ValueError(f"fit_gmm: n_components must be >= 1; got {n_components}")
    if not reg_covar >= 0:
        raise ValueError(f"fit_gmm: reg_covar must be >= 0; got {reg_covar}")
    if int(max_iter) < 0 or not tol >= 0 or int(n_init) < 1:
        raise ValueError(f"fit_gmm: need max_iter >= 0, tol >= 0 and n_init >= 1; got {max_iter}, {tol}, {n_init}")
    N, D = x.shape
    if N < max(2, K):
        raise ValueError(f"fit_gmm: need at least max(2, n_components) samples; got N={N} for n_components={K}")
    X = x.detach().to(torch.float64)
    bad = ~torch.isfinite(X).all(1)
    if bool(bad.any()):
        rows = torch.nonzero(bad)[:, 0]
        raise ValueError(f"fit_gmm: x has inf or NaN entries in {rows.numel()} rows, e.g. rows {rows[:10].tolist()}")
    dev = X.device
    prec_shape = {"full": (K, D, D), "tied": (D, D), "diag": (K, D), "spherical": (K,)}[covariance_type]
    w0 = None if weights_init is None else _as64(weights_init, "weights_init", (K,), dev)
    if w0 is not None and (bool((w0 < 0).any()) or abs(float(w0.sum()) - 1.0) > 1e-6):
        raise ValueError("fit_gmm: weights_init must be non-negative and sum to 1")
    m0 = None if means_init is None else _as64(means_init, "means_init", (K, D), dev)
    L0 = None if precisions_init is None else _factors_from_precisions(
        _as64(precisions_init, "precisions_init", prec_shape, dev), covariance_type, K, D)
    r0 = None if resp_init is None else _as64(resp_init, "resp_init", (N, K), dev)
    fixed = r0 is not None or (w0 is not None and m0 is not None and L0 is not None)
    g = _generator(seed)

    best: Optional[GMMFit] = None
    runs = 1 if fixed else int(n_init)
    for _ in range(runs):
        # initial parameters: estimated from responsibilities, then overridden by *_init
        weights = means = covs = factors = None
        if not (w0 is not None and m0 is not None and L0 is not None):
            resp = r0 if r0 is not None else _init_resp(X, K, init, g)
            nk, means, covs = _estimate(X, resp, covariance_type, reg_covar)
            weights = nk / N
        weights = w0 if w0 is not None else weights
        means = m0 if m0 is not None else means
        if L0 is not None:
            factors, covs = L0, _covariances_from_factors(L0, covariance_type)
        else:
            factors = _factors_from_covariances(covs, covariance_type, D)

        lower_bound, lbs, converged, n_iter = -math.inf, [], False, 0
        for n_iter in range(1, int(max_iter) + 1):
            prev = lower_bound
            lpn, log_resp = _e_step(X, means, factors, weights)
            nk, means, covs = _estimate(X, log_resp.exp(), covariance_type, reg_covar)
            weights = nk / nk.sum()
            factors = _factors_from_covariances(covs, covariance_type, D)
            lower_bound = float(lpn)
            lbs.append(lower_bound)
            if abs(lower_bound - prev) < tol:
                converged = True
                break
        if best is None or lower_bound > best.lower_bound:
            best = GMMFit(weights, means, covs, factors, covariance_type, converged, n_iter, lower_bound, lbs)
    assert best is not None
    if warn and not best.converged and max_iter > 0:
        warnings.warn(f"fit_gmm: the best of {runs} initialisation(s) did not converge in {max_iter} iterations "
                      f"(last change of the lower bound >= tol={tol}); increase max_iter or tol, or check for "
                      "degenerate data", GMMConvergenceWarning, stacklevel=2)
    return best
