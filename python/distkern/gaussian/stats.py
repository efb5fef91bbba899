r"""Streaming, mergeable Gaussian statistics: one Gaussian, K classes, or P positions.

For each Gaussian ``g`` the accumulators hold, in float64 on the device of the data,

=============  ==================  ==========================================================
``count``      ``n``               number of samples
``mean``       ``μ``  ``(D,)``     their mean
``scatter``    ``M₂`` ``(D, D)``   ``Σₙ zₙ zₙᵀ`` with ``zₙ = xₙ − μ`` (the centered scatter)
``cubic``      ``M₃`` ``(D,)``     ``Σₙ ‖zₙ‖² zₙ``
``quartic``    ``M₄`` ``()``       ``Σₙ ‖zₙ‖⁴`` (what the Ledoit-Wolf shrinkage needs)
=============  ==================  ==========================================================

``M₃`` and ``M₄`` serve the Ledoit-Wolf estimate only; ``GaussianStats(fourth_moments=False)`` leaves them at
zero and skips what keeps them (each merge's ``M₂ e``, a read of every scatter: at PaDiM's P = 3136, D = 550,
7.6 GB an update).

Every moment is *centered at the running mean*, so no term is ever a large raw moment minus a
large correction (the naive ``Σ x xᵀ − n μ μᵀ`` loses all digits when ``‖μ‖ ≫ σ``).

**Update.** A batch's own mean and centered moments are computed directly, then merged.

**Merge** (Chan, Golub & LeVeque 1979 for ``M₂``; the same idea carried to the scalar fourth
moment, as in Pébay 2008). Merging ``A`` and ``B``: ``n = n_A + n_B``, ``δ = μ_B − μ_A``,
``μ = μ_A + (n_B/n) δ``. Relative to the new mean, the samples of ``A`` are ``z − e`` with
``z`` centered at ``μ_A`` and ``e = μ − μ_A = (n_B/n) δ`` (for ``B``: ``e = −(n_A/n) δ``).
Expanding ``‖z − e‖² = ‖z‖² − 2 zᵀe + ‖e‖²`` and using ``Σ z = 0``, each part's moments move to
the new mean exactly:

.. math::

    M_2' &= M_2 + n\,e e^\top \\
    M_3' &= M_3 - e\,\mathrm{tr} M_2 - 2 M_2 e - n \lVert e\rVert^2 e \\
    M_4' &= M_4 + 4\,e^\top M_2 e - 4\,e^\top M_3 + 2\lVert e\rVert^2\,\mathrm{tr} M_2 + n\lVert e\rVert^4

and the merged moments are the sums of the two moved parts (``M₂`` reduces to Chan's
``M₂ᴬ + M₂ᴮ + n_A n_B/n · δδᵀ``). All terms are products of centered quantities and the shift
``e``, which is of the order of the spread between batch means, so the merge keeps the
accuracy of a two-pass computation whatever the offset of the data; it is exact in exact
arithmetic, associative, and the same formula merges ranks in :meth:`GaussianStats.all_reduce`.
"""
from __future__ import annotations

from typing import Any, Iterable, Literal, NamedTuple

import torch

from .factor import NotPositiveDefiniteError, check_ridge, whitening_factor
from .shrinkage import ledoit_wolf_shrinkage, oas_shrinkage, shrink

__all__ = ["GaussianStats", "Estimator"]

Estimator = Literal["empirical", "ledoit-wolf", "oas"]
_ESTIMATORS = ("empirical", "ledoit-wolf", "oas")
_FORMAT = "distkern.GaussianStats"
_VERSION = 1
_TENSORS = ("count", "mean", "scatter", "cubic", "quartic")
_MODES = ("single", "classes", "positions")


class _Moments(NamedTuple):
    count: torch.Tensor  # (G,) float64
    mean: torch.Tensor  # (G, D)
    scatter: torch.Tensor  # (G, D, D)  Σ z zᵀ
    cubic: torch.Tensor  # (G, D)     Σ ‖z‖² z
    quartic: torch.Tensor  # (G,)     Σ ‖z‖⁴


_FACTOR_CHUNK_BYTES = 1 << 26  # GaussianStats.factor: ~64 MiB of float64 covariances at a time


def _check_ddof(ddof, who: str) -> int:
    if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
        raise ValueError(f"{who}: ddof must be an int >= 0; got {ddof!r}")
    return ddof


def _zeros(G: int, D: int, device: torch.device, S: int | None = None) -> _Moments:
    """Empty accumulators of G groups; the scatter and the shrinkage moments of ``S`` (default G; 1 when only
    the pooled scatter is kept)."""
    z = dict(dtype=torch.float64, device=device)
    S = G if S is None else S
    return _Moments(torch.zeros(G, **z), torch.zeros(G, D, **z), torch.zeros(S, D, D, **z),
                    torch.zeros(S, D, **z), torch.zeros(S, **z))


def _available_memory() -> int | None:
    """Bytes that can still be allocated: Linux's ``MemAvailable`` plus free swap; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line)}
        return (kb["MemAvailable"] + kb.get("SwapFree", 0)) * 1024
    except (OSError, ValueError, IndexError, KeyError):
        return None


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.0f} kB"


def _check_fits(G: int, D: int, S: int, device: torch.device, mode: str, who: str) -> None:
    """Refuse CPU accumulators larger than the memory left, with what to do instead: zero-filling them would
    otherwise run until the kernel's OOM killer ends the process (Linux overcommits the allocation itself)."""
    if device.type != "cpu":
        return
    need = 8 * (G + G * D + S * D * D + S * D + S)
    avail = _available_memory()
    if avail is None or need <= avail:
        return
    hint = {"classes": f"; for a shared covariance (Lee et al.) GaussianStats(num_classes={G}, pooled=True) keeps one "
                       f"within-class scatter ({_size(8 * D * D)})",
            "positions": "; keep fewer features (PaDiM's random channel selection) or fit on a GPU",
            "single": ""}[mode]
    what = {"classes": "classes", "positions": "positions", "single": "Gaussian"}[mode]
    raise MemoryError(f"{who}: the float64 statistics of {G} {what} × D = {D} need {_size(need)} and "
                      f"{_size(avail)} are available{hint}")


def _centred(x: torch.Tensor, mean: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    """``x (B, G, D)`` centred on its float64 batch ``mean (G, D)``, in ``product_dtype``."""
    if torch.finfo(x.dtype).eps < torch.finfo(product_dtype).eps:
        return (x - mean.to(x.dtype)).to(product_dtype)  # centre at x's precision first: offsets cancel exactly
    z = x.to(product_dtype) - mean.to(product_dtype)
    if product_dtype == torch.float32:
        # the float32-rounded mean is off the true one by up to ½ulp(|mean|), which the scatter would
        # keep as n·δδᵀ (1.6 % of the covariance at |mean| = 1e6·std): centre once more on z's own
        # float64 mean, whose rounding is ε·|δ|, negligible
        z = z - (z.sum(0, dtype=torch.float64) / x.shape[0]).to(product_dtype)
    return z


def _single_moments(x: torch.Tensor, product_dtype: torch.dtype) -> tuple[torch.Tensor, _Moments]:
    """``(column sums (D,), moments)`` of ``x (N, D)`` (any float dtype, N > 0) for one Gaussian:
    ``distkern.centred_moments`` (csrc/mahalanobis/moments.cpp), which centres each row on the float64 mean
    (rounding it once to float32 for float32 products) and forms the products tile by tile, with no
    temporary of the batch's size on the CPU."""
    total, scatter, cubic, quartic = torch.ops.distkern.centred_moments(x, product_dtype == torch.float64)
    count = torch.full((1,), float(x.shape[0]), dtype=torch.float64, device=x.device)
    return total, _Moments(count, (total / x.shape[0])[None], scatter[None], cubic[None], quartic[None])


@torch.library.register_fake("distkern::centred_moments")
def _centred_moments_fake(x, double_products=False):
    torch._check(x.dim() == 2, lambda: f"distkern.centred_moments: x must be (N, D); got {tuple(x.shape)}")
    D = x.shape[1]
    f64 = dict(dtype=torch.float64)
    return x.new_empty(D, **f64), x.new_empty(D, D, **f64), x.new_empty(D, **f64), x.new_empty((), **f64)


def _class_centred(x: torch.Tensor, labels: torch.Tensor, uniq: tuple | None = None):
    """``(labels present (k,), inverse (N,), counts (k,) int64, counts float64, batch means (k, D), x − its class's
    batch mean)`` for ``x (N, D)`` float64; ``uniq``: ``torch.unique(labels, return_inverse=True,
    return_counts=True)`` when the caller has it."""
    present, inverse, counts = uniq if uniq is not None else torch.unique(labels, return_inverse=True,
                                                                           return_counts=True)
    cnt = counts.to(torch.float64)
    mean = torch.zeros(present.numel(), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    mean /= cnt[:, None]
    return present, inverse, counts, cnt, mean, x - mean[inverse]


_OP_ROWS_PER_CLASS = 32  # _grouped_moments: one centred_moments call a class from this many rows a class on average


def _grouped_moments(x: torch.Tensor, labels: torch.Tensor, product_dtype: torch.dtype, step: int):
    """The moments of ``x (N, D)`` (any float dtype) per label present, ``step`` classes at a time: yields
    ``(labels present, _Moments)`` for each chunk. Chunks bound the memory: all k scatters at once would be k·D²
    float64 (3.4 GB for 100 classes at D = 2048).

    With ≥ ``_OP_ROWS_PER_CLASS`` rows a class on average, each class's moments come from one
    ``distkern.centred_moments`` call on its rows (the batch sorted by label once), as one Gaussian's batch does —
    rows centred on the class's float64 mean, products tile by tile, in ``product_dtype`` (10 classes × 819 rows at
    D = 256: 45 → 20 ms an update). With fewer, the calls' fixed cost dominates: the rows are centred in float64 all
    at once and each class's scatter is one small float64 product."""
    uniq = torch.unique(labels, return_inverse=True, return_counts=True)
    present, inverse, counts = uniq
    k = present.numel()
    if x.shape[0] >= _OP_ROWS_PER_CLASS * k:
        xs = x[torch.argsort(inverse, stable=True)]
        bounds = [0] + counts.cumsum(0).tolist()
        double = product_dtype == torch.float64
        for c0 in range(0, k, step):
            c1 = min(c0 + step, k)
            parts = [torch.ops.distkern.centred_moments(xs[bounds[i]:bounds[i + 1]], double) for i in range(c0, c1)]
            total, scatter, cubic, quartic = (torch.stack(t) for t in zip(*parts))
            cnt = counts[c0:c1].to(torch.float64)
            yield present[c0:c1], _Moments(cnt, total / cnt[:, None], scatter, cubic, quartic)
        return
    _, _, _, cnt, mean, z = _class_centred(x.to(torch.float64), labels, uniq)
    sq = (z * z).sum(1)
    cubic = torch.zeros(k, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, inverse, sq[:, None] * z)
    quartic = torch.zeros(k, dtype=z.dtype, device=z.device).index_add_(0, inverse, sq * sq)
    rows = z[torch.argsort(inverse, stable=True)].split(counts.tolist())
    for c0 in range(0, k, step):
        sl = slice(c0, c0 + step)
        yield present[sl], _Moments(cnt[sl], mean[sl], torch.stack([r.T @ r for r in rows[sl]]), cubic[sl], quartic[sl])


def _class_moments(x: torch.Tensor, labels: torch.Tensor, product_dtype: torch.dtype):
    """``(labels present (k,), counts (k,), means (k, D), pooled scatter (D, D))`` of ``x (N, D)`` float64: the
    rows centred on their class's batch mean, and one product of them all."""
    present, _, _, cnt, mean, z = _class_centred(x, labels)
    z = z.to(product_dtype)
    return present, cnt, mean, (z.T @ z).to(torch.float64)


def _merge_pooled(a: _Moments, present: torch.Tensor, nb: torch.Tensor, mb: torch.Tensor,
                  sb: torch.Tensor) -> _Moments:
    """Merge the classes ``present`` (counts ``nb``, means ``mb``) and their pooled scatter ``sb (D, D)`` into
    pooled accumulators ``a`` (in place): per class Chan's ``M₂ᴬ + M₂ᴮ + n_A n_B/n · δδᵀ``, summed over the
    classes, is ``a.scatter + sb + Wᵀ W`` with the rows of W ``√(n_A n_B / n) δ``."""
    na, ma = a.count[present], a.mean[present]
    n = na + nb
    delta = mb - ma
    w = delta * (na * nb / n).sqrt()[:, None]
    a.scatter[0].add_(sb).addmm_(w.T, w)
    a.count[present] = n
    a.mean[present] = ma + (nb / n)[:, None] * delta
    return a


def _shift(cubic: torch.Tensor, quartic: torch.Tensor, n: torch.Tensor, e: torch.Tensor, Se: torch.Tensor,
           tr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M₃, M₄)`` of a part's samples re-centered at ``mean + e`` (``e (G, D)``), from its ``M₃ (G, D)``,
    ``M₄ (G,)``, count ``n``, ``Se = M₂ e`` and ``tr = tr M₂``; see the module docstring. (``M₂`` is merged
    in Chan's form by the callers.)"""
    ee = (e * e).sum(-1)
    m3 = cubic - e * tr[:, None] - 2.0 * Se - (n * ee)[:, None] * e
    m4 = quartic + 4.0 * (e * Se).sum(-1) - 4.0 * (e * cubic).sum(-1) + 2.0 * ee * tr + n * ee * ee
    return m3, m4


def _moved(m: _Moments, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_shift` of a part whose scatter is held: ``M₂ e`` and ``tr M₂`` from ``m.scatter``.

    ``M₂ e`` as ``eᵀ M₂`` (``M₂`` is symmetric up to rounding): the batched row-vector product streams the
    scatter at the memory's rate, where the matrix-vector one ran at ~40 % of it (PaDiM at P = 3136,
    D = 550: 0.23 s against 0.54 s for the 7.6 GB, once per update)."""
    return _shift(m.cubic, m.quartic, m.count, e, torch.bmm(e[:, None, :], m.scatter)[:, 0],
                  m.scatter.diagonal(dim1=-2, dim2=-1).sum(-1))


def _shifts(na: torch.Tensor, nb: torch.Tensor, delta: torch.Tensor):
    """Count, safe divisor, and the shifts ``e_A = (n_B/n) δ``, ``e_B = −(n_A/n) δ`` of a merge."""
    n = na + nb
    safe = torch.where(n > 0, n, 1.0)
    return n, safe, (nb / safe)[:, None] * delta, -(na / safe)[:, None] * delta


def _merge(a: _Moments, b: _Moments, *, inplace: bool = False, moments: bool = True) -> _Moments:
    """Exact pairwise merge of two sets of centered moments (Chan et al.; module docstring). ``inplace``:
    the merged scatter is written over ``a.scatter`` (an accumulator no one else holds). ``moments`` False:
    ``M₃`` / ``M₄`` are not kept (``a``'s, zeros, are returned as they are)."""
    delta = b.mean - a.mean
    n, safe, ea, eb = _shifts(a.count, b.count, delta)
    if moments:
        sa, sb = _moved(a, ea), _moved(b, eb)
        cubic, quartic = sa[0] + sb[0], sa[1] + sb[1]
    else:
        cubic, quartic = a.cubic, a.quartic
    # M₂ in Chan's form of the same sum, n_A e_A e_Aᵀ + n_B e_B e_Bᵀ = (n_A n_B / n) δδᵀ: two passes over
    # the (G, D, D) scatters instead of six
    c = a.count * b.count / safe
    scatter = a.scatter.add_(b.scatter) if inplace else a.scatter + b.scatter
    scatter.addcmul_((c[:, None] * delta)[:, :, None], delta[:, None, :])
    return _Moments(n, a.mean + ea, scatter, cubic, quartic)


def _batch_last(x: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, P, D)`` copied into float64 with the batch axis last: a ``(P, D, B + 1)`` view (the last
    column left for :func:`_merge_positions`) whose rows of ``B`` are contiguous. Where ``x`` is a
    ``(B, D, P)`` embedding seen as ``(B, P, D)`` (PaDiM's) or a contiguous ``(B, P, D)``, one 2-D
    transpose of ``(B, ·)`` into ``(·, B)`` (49 ms against 87 for the general 3-D permuted copy at
    B = 32, P = 3136, D = 100); the buffer is then ``(D, P, B + 1)`` or ``(P, D, B + 1)`` in memory, either
    of which the batched products read in place. Returns that view and the 1-D buffer under it.

    The buffer is the first elements of ``scratch`` (1-D) when that float64 tensor on ``x``'s device is
    large enough (the previous batch's, kept by :class:`GaussianStats`), and then ``scratch`` is returned
    as the buffer: a fresh one is new memory, whose first touch costs more than the copy (at P = 3136,
    D = 550, B = 32: 441 MB, an update 1.97 → 1.33 s with it reused; D = 100: 0.15 → 0.13 s)."""
    B, P, D = x.shape
    n = P * D * (B + 1)
    if scratch is not None and scratch.numel() >= n and scratch.device == x.device and scratch.dtype == torch.float64:
        whole = scratch
    else:
        whole = torch.empty(n, dtype=torch.float64, device=x.device)
    flat = whole[:n]
    if x.transpose(1, 2).is_contiguous():  # (B, D, P) in memory
        buf = flat.view(D * P, B + 1)
        buf[:, :B].copy_(x.transpose(1, 2).reshape(B, D * P).T)
        return buf.view(D, P, B + 1).permute(1, 0, 2), whole
    if x.is_contiguous():
        buf = flat.view(P * D, B + 1)
        buf[:, :B].copy_(x.reshape(B, P * D).T)
        return buf.view(P, D, B + 1), whole
    buf = flat.view(P, D, B + 1)
    buf[..., :B].copy_(x.permute(1, 2, 0))
    return buf, whole


def _f32_products(zt: torch.Tensor, out: torch.Tensor, *, add: bool) -> torch.Tensor:
    """``out (P, D, D)`` float64 ``=`` (or ``+=`` with ``add``) ``Z Zᵀ`` for ``zt (P, D, B)`` float32, ~16 MB of float32
    products at a time; returns ``out``."""
    D = zt.shape[1]
    step = max(1, (16 << 20) // (D * D * 4))
    for p0 in range(0, zt.shape[0], step):
        blk = zt[p0:p0 + step]
        prod = torch.bmm(blk, blk.transpose(1, 2))
        if add:
            out[p0:p0 + step].add_(prod)
        else:
            out[p0:p0 + step].copy_(prod)
    return out


def _merge_positions(a: _Moments | None, x: torch.Tensor, product_dtype: torch.dtype, total: torch.Tensor,
                     xt: torch.Tensor | None, moments: bool = True) -> _Moments:
    """:func:`_merge` of the batch ``x (B, P, D)`` (column sums ``total (P, D)``, float64) into the
    accumulators ``a``, whose scatter is updated in place, without forming the batch's own. ``xt``: with
    float64 products, ``x`` as :func:`_batch_last` laid it out (centred here in place); None with float32.

    PaDiM's scatters are P × D² float64 (250 MB at 3136 × 100²): each pass over them costs more than
    the batch's arithmetic. Here the batch is centred into one contiguous ``(P, D, B)`` block ``Z``, and
    ``M₂ ← M₂ + Z Zᵀ + (n_A n_B / n) δδᵀ`` is one batched GEMM accumulating into ``M₂`` (float64
    products: ``Z`` with a column ``√c·δ`` appended; float32: ``Z Zᵀ`` per chunk of positions, then
    a rank-1 float64 update), while the batch's ``M₂ e_B`` and ``tr M₂`` come from ``Z`` itself. Per
    batch: one read of ``M₂`` for ``M₂ e_A`` and one read-modify-write, where forming the batch's scatter
    and merging it took six (with the transposing copy in update(): 1.50 s → 0.23 s an update at B = 32,
    P = 3136, D = 100, on 2 cores).

    ``a`` None (the first batch): the batch's own moments, its scatter written by the products themselves —
    no zeroed accumulators to fill, shift and add into (a pass each over the P × D² float64).

    ``moments`` False: ``M₃`` / ``M₄`` stay zero, and neither the batch's (``‖z‖²``, ``Z‖z‖²``, ``Z Zᵀ e_B``) nor the
    read of ``M₂`` for ``M₂ e_A`` is made."""
    nb_int, P, D = x.shape
    mean_b = total / nb_int
    if xt is not None:  # float64: centred in the (P, D, B + 1) buffer, whose last column takes √c·δ
        zt = xt[..., :nb_int].sub_(mean_b[:, :, None])
    else:
        zt = _centred(x, mean_b, product_dtype).permute(1, 2, 0).contiguous()  # (P, D, B)
    if moments:
        sq = torch.linalg.vector_norm(zt, dim=1).square()  # (P, B) ‖z‖², without a (P, D, B) temporary of z²
        sq64 = sq.to(torch.float64)
        cubic_b = torch.bmm(zt, sq[:, :, None])[..., 0].to(torch.float64)
        quartic_b = (sq64 * sq64).sum(1)
    elif a is None:
        cubic_b = torch.zeros(P, D, dtype=torch.float64, device=x.device)
        quartic_b = torch.zeros(P, dtype=torch.float64, device=x.device)
    if a is None:
        if xt is not None:
            scatter = torch.bmm(zt, zt.transpose(1, 2))
        else:
            scatter = _f32_products(zt, torch.empty(P, D, D, dtype=torch.float64, device=x.device), add=False)
        count = torch.full((P,), float(nb_int), dtype=torch.float64, device=x.device)
        return _Moments(count, mean_b, scatter, cubic_b, quartic_b)
    nb = torch.full_like(a.count, float(nb_int))
    delta = mean_b - a.mean
    n, safe, ea, eb = _shifts(a.count, nb, delta)
    if moments:
        sa = _moved(a, ea)
        # Zᵀe as eᵀZ: a row-vector product over the (P, D, B) block, 3× faster than the transposed one at D = 550
        se_b = torch.bmm(zt, torch.bmm(eb.to(zt.dtype)[:, None, :], zt).transpose(1, 2))[..., 0].to(torch.float64)
        sb = _shift(cubic_b, quartic_b, nb, eb, se_b, sq64.sum(1))
        cubic, quartic = sa[0] + sb[0], sa[1] + sb[1]
    else:
        cubic, quartic = a.cubic, a.quartic
    v = (a.count * nb / safe).sqrt()[:, None] * delta  # √c·δ, c = n_A n_B / n
    if xt is not None:
        xt[..., nb_int] = v
        a.scatter.baddbmm_(xt, xt.transpose(1, 2))
    else:
        _f32_products(zt, a.scatter, add=True)
        a.scatter.baddbmm_(v[:, :, None], v[:, None, :])
    return _Moments(n, a.mean + ea, a.scatter, cubic, quartic)


def _progress(data: Iterable[Any], progress: bool) -> Iterable[Any]:
    if not progress:
        return data
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return data
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    return tqdm(data, total=total, desc="GaussianStats", unit="batch", leave=False, disable=None)


class GaussianStats:
    r"""Streaming fp64 mean / covariance (and shrinkage moments) of one, K or P Gaussians.

    Three layouts, fixed at construction:

    * one Gaussian: ``GaussianStats()``; ``update(x)`` with ``x (N, D)``;
    * K classes: ``GaussianStats(num_classes=K)``; ``update(x, labels)`` with ``x (N, D)``
      and integer ``labels (N,)`` in ``[0, K)``. With ``pooled=True`` only the class counts and
      means and one within-class scatter ``Σ_k M₂_k`` are kept — ``D² + K·D`` floats instead of
      ``K·D²`` (1000 classes at D = 2048: 34 MB instead of 34 GB) — for the shared covariance of
      Lee et al.: :meth:`covariance` / :meth:`factor` then need ``pooled=True``, and Ledoit-Wolf,
      whose fourth moments move with each class's own scatter, is not available (OAS is);
    * P positions: ``GaussianStats(num_positions=P)``; ``update(x)`` with ``x (B, P, D)`` (or
      a ``(B, D, H, W)`` feature map with ``H·W = P``): one Gaussian per position, PaDiM-style.

    ``product_dtype=torch.float32`` computes each batch's centred scatter with a float32 matrix
    product (2–4× faster on CPUs, whose float64 GEMM runs at half rate or less) and still merges
    in float64; the default float64 keeps every step in float64. With P positions the batch's pass
    over the P × D² float64 accumulators costs more than its products, and float64 is the faster of
    the two there (a PaDiM batch of 32 × 3136 × 100 on 2 cores: 0.23 s, 0.44 s with float32 products).

    ``fourth_moments=False`` keeps no third and fourth moments, which only the Ledoit-Wolf estimate needs
    (it then raises; empirical, OAS and ridge estimates are unchanged): each update skips a read of every
    scatter matrix for them — PaDiM's update of 32 images at P = 3136, D = 550 reads 7.6 GB less. Statistics
    with and without them merge into ones without (``merge``; :meth:`all_reduce` needs every rank alike).

    Results have shape ``(D,)`` / ``(D, D)`` for one Gaussian (or ``pooled=True``), and a
    leading ``K`` or ``P`` otherwise. ``D`` is taken from the first batch unless
    ``num_features`` is given (give it when a rank of :meth:`all_reduce` may see no data).
    Accumulators live on the device of the first batch (or ``device``), in float64, whatever
    the input dtype. See the module docstring for the numerically safe merge.

    Example::

        stats = GaussianStats(num_classes=10).fit(loader)        # loader yields (features, labels)
        L = stats.factor("ledoit-wolf", pooled=True)            # shared covariance, Lee et al. 2018
        d2 = distkern.mahalanobis(z, stats.mean[3].float(), L)
    """

    def __init__(self, num_features: int | None = None, *, num_classes: int | None = None,
                 num_positions: int | None = None, device: torch.device | str | None = None,
                 product_dtype: torch.dtype = torch.float64, pooled: bool = False,
                 fourth_moments: bool = True) -> None:
        if num_classes is not None and num_positions is not None:
            raise ValueError("GaussianStats: give num_classes or num_positions, not both")
        if not isinstance(pooled, bool):
            raise TypeError(f"GaussianStats: pooled must be a bool; got {pooled!r}")
        if not isinstance(fourth_moments, bool):
            raise TypeError(f"GaussianStats: fourth_moments must be a bool; got {fourth_moments!r}")
        if pooled and num_classes is None:
            raise ValueError("GaussianStats: pooled=True keeps one within-class scatter of K classes; give num_classes")
        for name, v in (("num_features", num_features), ("num_classes", num_classes), ("num_positions", num_positions)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"GaussianStats: {name} must be a positive int; got {v!r}")
        if product_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"GaussianStats: product_dtype must be torch.float64 or torch.float32; got {product_dtype}")
        self.product_dtype = product_dtype
        self.mode: str = "classes" if num_classes is not None else "positions" if num_positions is not None else "single"
        self.num_groups: int = num_classes or num_positions or 1
        self.num_features: int | None = num_features
        self.pooled: bool = pooled
        self.fourth_moments: bool = fourth_moments
        self._device = torch.device(device) if device is not None else None
        self._m: _Moments | None = None
        self._batches = 0
        self._released = False  # emptied by factor(release=True)
        # the float64 positions path's (P, D, B + 1) batch buffer, kept from one update to the next
        # (_batch_last); dropped when the statistics are read (_require) or saved
        self._scratch: torch.Tensor | None = None
        if num_features is not None and self._device is not None:
            S = 1 if pooled else self.num_groups
            _check_fits(self.num_groups, num_features, S, self._device, self.mode, "GaussianStats")
            self._m = _zeros(self.num_groups, num_features, self._device, S)

    # ------------------------------------------------------------------ accumulation
    def _alloc(self, D: int, device: torch.device, who: str, lazy: bool = False) -> None:
        """Check D and the device; allocate zeroed accumulators on the first call (unless ``lazy``: the caller
        then builds them from the batch)."""
        if self.num_features is not None and D != self.num_features:
            raise ValueError(f"{who}: expected {self.num_features} features (the last dimension); got {D}")
        if self._m is None:
            if self._device is not None and device != self._device:
                raise ValueError(f"{who}: data is on {device} but the statistics were created for {self._device}")
            S = 1 if self.pooled else self.num_groups
            _check_fits(self.num_groups, D, S, device, self.mode, who)
            self.num_features, self._device = D, device
            if not lazy:
                self._m = _zeros(self.num_groups, D, device, S)
        elif device != self._device:
            raise ValueError(f"{who}: data is on {device} but the statistics accumulate on {self._device}; move the batch")

    @property
    def _group_name(self) -> str:
        return {"classes": "class", "positions": "position", "single": "Gaussian"}[self.mode]

    def update(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> GaussianStats:
        """Add a batch: ``x (N, D)`` (one Gaussian), ``x (N, D)`` + ``labels (N,)`` (classes), ``x (B, P, D)`` (positions).

        Any floating dtype; converted to float64. Returns ``self``.

        Raises:
            ValueError: wrong shape, labels missing / unexpected / out of range, data on another
                device, inf or NaN in the batch (the message names the batch and the rows).
            TypeError: non-floating ``x`` or non-integer ``labels``.
        """
        who, b = "GaussianStats.update", self._batches
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{who}: x must be a floating-point tensor; got {getattr(x, 'dtype', type(x).__name__)}")
        if self.mode == "positions":
            P = self.num_groups
            if x.dim() == 4 and x.shape[2] * x.shape[3] == P:
                x = x.flatten(2).transpose(1, 2)
            if x.dim() != 3 or x.shape[1] != P:
                raise ValueError(f"{who}: x must have shape (B, P={P}, D) (or (B, D, H, W) with H*W = {P}); got {tuple(x.shape)}")
        elif x.dim() != 2:
            raise ValueError(f"{who}: x must have shape (N, D); got {tuple(x.shape)}")
        if self.mode == "classes":
            if labels is None:
                raise ValueError(f"{who}: labels (N,) are required with num_classes={self.num_groups}")
            if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
                    or labels.dtype == torch.bool:
                raise TypeError(f"{who}: labels must be an integer tensor; got {getattr(labels, 'dtype', type(labels).__name__)}")
            if labels.shape != (x.shape[0],):
                raise ValueError(f"{who}: labels must have shape ({x.shape[0]},) to match x; got {tuple(labels.shape)}")
        elif labels is not None:
            raise ValueError(f"{who}: labels are only accepted with num_classes (this is a {self.mode} GaussianStats)")
        # P positions build their accumulators from the first batch (_merge_positions)
        self._alloc(x.shape[-1], x.device, who, lazy=self.mode == "positions" and x.shape[0] > 0)
        if x.shape[0] == 0:
            return self
        x = x.detach()  # statistics are not differentiable; never hold a graph
        # A non-finite entry makes the batch's float64 column sums non-finite: check those D
        # values, and scan the rows (to name them) only then, instead of an isfinite pass per batch.
        xt, bm = None, None
        if self.mode == "single":
            total, bm = _single_moments(x, self.product_dtype)  # the column sums and the batch's moments in one op
        elif self.mode == "positions" and self.product_dtype == torch.float64:
            # x laid out as (P, D, B) float64 first (one transposing pass, with room for _merge_positions'
            # extra column): the column sums and the centring then run along contiguous rows
            xt, self._scratch = _batch_last(x, self._scratch)
            total = xt[..., :-1].sum(2)
        else:
            total = x.sum(0, dtype=torch.float64)
        if not bool(torch.isfinite(total).all()):
            finite = torch.isfinite(x).all(-1)
            bad = torch.nonzero(~finite)[:5].tolist()
            what = "(sample, position) pairs" if self.mode == "positions" else "rows"
            bad_s = [tuple(r) for r in bad] if self.mode == "positions" else [r[0] for r in bad]
            if not bad:  # every entry finite, their float64 sum not: magnitudes near the float64 limit
                raise ValueError(f"{who}: batch {b} has finite values whose column sums overflow float64 "
                                 f"(max |x| = {float(x.abs().max()):.3g}); rescale the features")
            raise ValueError(f"{who}: batch {b} contains inf or NaN in {what} {bad_s}{'...' if len(bad) == 5 else ''}")
        assert self._m is not None or self.mode == "positions"
        if self.mode == "classes":
            assert labels is not None
            labels = labels.to(device=x.device, dtype=torch.int64)
            out = (labels < 0) | (labels >= self.num_groups)
            if bool(out.any()):
                rows = torch.nonzero(out)[:5, 0].tolist()
                raise ValueError(f"{who}: batch {b}: labels must lie in [0, {self.num_groups}); rows {rows} have "
                                 f"{labels[rows].tolist()}")
            if self.pooled:
                self._m = _merge_pooled(self._m, *_class_moments(x.to(torch.float64), labels, self.product_dtype))
            else:
                # the present classes' moments formed, gathered, merged and written back ~64 MiB at a time
                D = x.shape[1]
                step = max(1, _FACTOR_CHUNK_BYTES // (D * D * 8))
                for ii, part in _grouped_moments(x, labels, self.product_dtype, step):
                    merged = _merge(_Moments(*(t[ii] for t in self._m)), part, moments=self.fourth_moments)
                    for acc, new in zip(self._m, merged):
                        acc[ii] = new
        else:
            if self.mode == "positions":
                self._m = _merge_positions(self._m, x, self.product_dtype, total, xt, self.fourth_moments)
            else:
                assert bm is not None
                self._m = _merge(self._m, bm, inplace=True, moments=self.fourth_moments)
        self._batches += 1
        return self

    def fit(self, data: Iterable[Any], *, progress: bool = True) -> GaussianStats:
        """:meth:`update` with every batch of ``data`` (tensors, or ``(x, labels, ...)`` tuples); returns ``self``.

        Without ``num_classes`` only the first element of a tuple is used (a loader that yields
        ``(features, target)`` fits one Gaussian to the features). Shows a tqdm progress bar when
        ``progress`` and tqdm is installed and stderr is a terminal; silently none otherwise.
        """
        for item in _progress(data, progress):
            if isinstance(item, (tuple, list)):
                x, y = item[0], (item[1] if self.mode == "classes" and len(item) > 1 else None)
            else:
                x, y = item, None
            self.update(x, y)
        return self

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Merge ``other`` (same layout and D) into ``self`` exactly (Chan et al.); returns ``self``.

        The result does not depend on how the samples were split or (up to rounding) on the
        order of merges. ``other``'s tensors are moved to ``self``'s device. When ``other`` keeps no fourth
        moments (``fourth_moments=False``), neither does the result.
        """
        if not isinstance(other, GaussianStats):
            raise TypeError(f"GaussianStats.merge: expected a GaussianStats; got {type(other).__name__}")
        if (other.mode, other.num_groups, other.pooled) != (self.mode, self.num_groups, self.pooled):
            raise ValueError(f"GaussianStats.merge: layouts differ: {self._layout} vs {other._layout}")
        if other._m is None:
            return self
        assert other.num_features is not None
        self._alloc(other.num_features, self._device or other.device, "GaussianStats.merge")
        assert self._m is not None
        if self.fourth_moments and not other.fourth_moments:  # after the checks: a refused merge changes nothing
            self._m = self._m._replace(cubic=self._m.cubic.zero_(), quartic=self._m.quartic.zero_())
            self.fourth_moments = False
        self._m = self._merge_moments(self._m, _Moments(*(t.to(self._device) for t in other._m)))
        self._batches += other._batches
        return self

    @property
    def _layout(self) -> str:
        return f"{self.mode} x {self.num_groups}{' (pooled)' if self.pooled else ''}"

    def _merge_moments(self, a: _Moments, b: _Moments) -> _Moments:
        """``a`` merged with ``b`` (whole accumulators of this layout; ``a`` is overwritten when pooled)."""
        if not self.pooled:
            return _merge(a, b, moments=self.fourth_moments)
        present = torch.nonzero(b.count > 0)[:, 0]
        return _merge_pooled(a, present, b.count[present], b.mean[present], b.scatter[0])

    def all_reduce(self, group: Any = None) -> GaussianStats:
        """Merge the statistics of every rank of ``group``; every rank ends with the same totals.

        Each rank's moments are all-gathered (one packed float64 tensor; on the current CUDA
        device for NCCL, on the CPU otherwise) and merged in rank order with the exact pairwise
        formula, so the result is deterministic and bitwise identical on all ranks. A rank that
        saw no data contributes nothing (it learns ``D`` from the others). Layout or ``D``
        mismatches raise ``ValueError`` on every rank. Returns ``self``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("GaussianStats.all_reduce: torch.distributed is not initialised (call init_process_group)")
        world = dist.get_world_size(group)
        comm = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend(group)) else torch.device("cpu")
        header = torch.tensor([_MODES.index(self.mode) + 4 * self.pooled + 8 * (not self.fourth_moments),
                               self.num_groups, self.num_features or 0], dtype=torch.int64, device=comm)
        headers = [torch.empty_like(header) for _ in range(world)]
        dist.all_gather(headers, header, group=group)
        hs = [tuple(int(v) for v in h.tolist()) for h in headers]
        dims = {h[2] for h in hs if h[2] > 0}
        if len({h[:2] for h in hs}) > 1 or len(dims) > 1:
            raise ValueError(f"GaussianStats.all_reduce: ranks disagree on (layout, groups, features): "
                             f"{[(_MODES[h[0] % 4] + (' pooled' if h[0] & 4 else '') + (' without fourth moments' if h[0] & 8 else ''), h[1], h[2] or None) for h in hs]}")
        if not dims:
            return self
        D, G = dims.pop(), self.num_groups
        if self._m is None:
            self._alloc(D, self._device or comm, "GaussianStats.all_reduce")
        assert self._m is not None
        mine = torch.cat([t.reshape(-1) for t in self._m]).to(comm)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        S = 1 if self.pooled else G
        sizes = [G, G * D, S * D * D, S * D, S]
        shapes = [(G,), (G, D), (S, D, D), (S, D), (S,)]
        acc: _Moments | None = None
        for p in parts:
            m = _Moments(*(t.reshape(s).to(self._device) for t, s in zip(p.split(sizes), shapes)))
            acc = m if acc is None else self._merge_moments(acc, m)
        self._m = acc
        return self

    # ------------------------------------------------------------------ results
    @property
    def device(self) -> torch.device | None:
        """Device of the accumulators (``None`` until the first batch when not given)."""
        return self._device

    def _require(self, who: str) -> _Moments:
        self._scratch = None  # updates are over, for now: the batch buffer goes
        if self._m is None:
            if self._released:
                raise ValueError(f"GaussianStats.{who}: the statistics were released by factor(release=True); "
                                 f"update or fit again first")
            raise ValueError(f"GaussianStats.{who}: no data yet (call update or fit first)")
        return self._m

    def _squeeze(self, t: torch.Tensor) -> torch.Tensor:
        return t[0] if self.mode == "single" else t

    def _groups(self, idx: list[int]) -> str:
        s = ", ".join(map(str, idx[:5])) + ("..." if len(idx) > 5 else "")
        return f"{self._group_name}{'es' if self.mode == 'classes' and len(idx) > 1 else 's' if len(idx) > 1 else ''} {s}"

    @property
    def count(self) -> int | torch.Tensor:
        """Samples seen: an ``int`` for one Gaussian or P positions (each position sees every sample), ``(K,)`` int64 for classes."""
        if self._m is None:
            return torch.zeros(self.num_groups, dtype=torch.int64) if self.mode == "classes" else 0
        c = self._m.count.to(torch.int64)
        return c if self.mode == "classes" else int(c[0])

    @property
    def mean(self) -> torch.Tensor:
        """Mean, float64: ``(D,)``, ``(K, D)`` or ``(P, D)``. Raises ``ValueError`` naming any group with no samples."""
        m = self._require("mean")
        empty = torch.nonzero(m.count == 0)[:, 0].tolist()
        if empty:
            raise ValueError(f"GaussianStats.mean: {self._groups(empty)} ha{'ve' if len(empty) > 1 else 's'} no samples")
        return self._squeeze(m.mean.clone())

    def _counts(self, pooled: bool, who: str, ddof: int) -> torch.Tensor:
        """The sample counts (``()`` pooled, else ``(G,)``) after checking that every covariance is defined."""
        m = self._require(who)
        need = max(2, ddof + 1)
        if pooled:
            n = m.count.sum()
            if float(n) < need:
                raise ValueError(f"GaussianStats.{who}: a covariance needs at least {need} samples"
                                 f"{f' with ddof={ddof}' if ddof > 1 else ''}; got {int(n)}")
            return n
        n = m.count
        few = torch.nonzero(n < need)[:, 0].tolist()
        if few:
            what = "the Gaussian" if self.mode == "single" else self._groups(few)
            raise ValueError(f"GaussianStats.{who}: a covariance needs at least {need} samples"
                             f"{f' with ddof={ddof}' if ddof > 1 else ''}; {what} "
                             f"ha{'ve' if len(few) > 1 else 's'} only {sorted({int(n[i]) for i in few})} sample(s)")
        return n

    def _check_estimator(self, pooled: bool, estimator: str, who: str) -> None:
        """Refuse what these statistics cannot estimate: Ledoit-Wolf without the fourth moments, a per-group
        estimate from pooled statistics, Ledoit-Wolf from pooled ones."""
        if estimator == "ledoit-wolf" and not self.fourth_moments:
            raise ValueError(f"GaussianStats.{who}: Ledoit-Wolf needs the fourth moments, which these statistics do "
                             "not keep (GaussianStats(..., fourth_moments=False)); use estimator='oas' or 'empirical' "
                             "(with a ridge), or fit with fourth_moments=True")
        if not self.pooled:
            return
        if not pooled:
            raise ValueError(f"GaussianStats.{who}: these statistics keep the pooled within-class scatter only "
                             f"(GaussianStats(num_classes={self.num_groups}, pooled=True)); pass pooled=True")
        if estimator == "ledoit-wolf":
            raise ValueError(f"GaussianStats.{who}: Ledoit-Wolf needs each class's fourth moments, which move with "
                             "each class's own scatter, and pooled=True keeps only their sum; use estimator='oas' or "
                             "'empirical', or GaussianStats(num_classes=K) without pooled")

    def _estimate(self, estimator: str, pooled: bool, who: str, ddof: int = 0,
                  groups: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(covariance, shrinkage) of every group, or of ``groups`` (a slice) only."""
        if estimator not in _ESTIMATORS:
            raise ValueError(f"GaussianStats.{who}: estimator must be one of {_ESTIMATORS}; got {estimator!r}")
        self._check_estimator(pooled, estimator, who)
        n = self._counts(pooled, who, ddof)
        m = self._m
        if pooled:
            scatter, m4 = m.scatter.sum(0), m.quartic.sum()
        else:
            scatter, m4 = m.scatter, m.quartic
            if groups is not None:
                n, scatter, m4 = n[groups], scatter[groups], m4[groups]
        # symmetric to the bit, in one new tensor and one in-place pass (PaDiM: 3136 × D² float64, where
        # dividing, adding and halving into three new tensors took ~3× as long)
        emp = torch.add(scatter, scatter.transpose(-1, -2)).mul_((0.5 / n)[..., None, None])
        if estimator == "empirical":
            s = torch.zeros_like(n)
        else:
            s = ledoit_wolf_shrinkage(n, emp, m4) if estimator == "ledoit-wolf" else oas_shrinkage(n, emp)
            emp = shrink(emp, s)
        if ddof:
            emp.mul_((n / (n - ddof))[..., None, None])
        return emp, s

    def covariance(self, estimator: Estimator = "empirical", *, ridge: float = 0.0, pooled: bool = False,
                   ddof: int = 0) -> torch.Tensor:
        """Covariance estimate(s), float64: ``(D, D)`` for one Gaussian or ``pooled``, else ``(K | P, D, D)``.

        Args:
            estimator: ``"empirical"`` (maximum likelihood, divides by n, = ``sklearn.covariance.
                EmpiricalCovariance``), ``"ledoit-wolf"`` (= ``LedoitWolf``) or ``"oas"`` (= ``OAS``),
                each computed from the streamed moments; the coefficients are :meth:`shrinkage`.
            ridge: added to the diagonal after shrinkage (diagonal loading, PaDiM uses 0.01), ``≥ 0``.
            pooled: one covariance shared by all groups — the within-group scatter ``Σ_g M₂_g / N``
                (Lee et al. 2018's shared class covariance); shrinkage treats the group-centered
                residuals ``x − μ_y`` as the data.
            ddof: the estimate is scaled by ``n / (n − ddof)``: ``ddof=1`` gives the empirical covariance
                divided by ``n − 1``, as ``torch.cov`` / ``numpy.cov`` (and anomalib's PaDiM) compute it.

        Raises:
            ValueError: no data, an unknown estimator, a negative ridge or ddof, or a group (named) with
                fewer than ``max(2, ddof + 1)`` samples.
        """
        ridge = check_ridge(ridge, "GaussianStats.covariance")
        ddof = _check_ddof(ddof, "GaussianStats.covariance")
        cov, _ = self._estimate(estimator, pooled, "covariance", ddof)
        if ridge:
            cov.diagonal(dim1=-2, dim2=-1).add_(ridge)
        return cov if pooled else self._squeeze(cov)

    def shrinkage(self, estimator: Estimator = "ledoit-wolf", *, pooled: bool = False) -> torch.Tensor:
        """Shrinkage coefficient(s) ``s`` in ``Σ = (1 − s) S + s (tr S / D) I``.

        float64 ``()`` (one Gaussian or ``pooled``) or ``(K | P,)``; 0 for ``"empirical"``."""
        _, s = self._estimate(estimator, pooled, "shrinkage")
        return s if pooled else self._squeeze(s)

    def factor(self, estimator: Estimator = "empirical", *, ridge: float = 0.0, pooled: bool = False,
               dtype: torch.dtype | None = torch.float32, ddof: int = 0, release: bool = False) -> torch.Tensor:
        """Whitening factor(s) ``L`` with ``(Σ + ridge·I)⁻¹ = L Lᵀ`` for :func:`distkern.mahalanobis`.

        ``(D, D)`` or ``(K | P, D, D)`` lower-triangular, ``dtype`` (default float32; ``None``: float64),
        computed in float64 by :func:`~distkern.gaussian.whitening_factor` from the estimate
        :meth:`covariance` gives with the same ``estimator``, ``pooled`` and ``ddof`` (``ddof=1``: the
        covariance divided by ``n − 1``, as PaDiM uses it), plus ``ridge`` on the diagonal.

        Memory: no ``(K | P, D, D)`` covariance is materialised beside the accumulators. The empirical
        estimate of groups that share one count (positions, or balanced classes) is read straight from
        them, symmetrised and scaled as it loads (PaDiM at P = 3136, D = 550: 7.6 GB of float64 not
        allocated, and a transposed pass over it not made); shrinkage estimates are formed ~64 MiB of
        covariances at a time.

        ``release=True`` says the statistics are not needed after this call: they are emptied by it,
        whether it succeeds or raises (fit again to use the object). On the CPU, where the factors are read
        straight from the accumulators as above, the memory of each scatter matrix goes back to the
        operating system as soon as it is factorised, so the factors take the place of the scatter instead
        of adding to it (PaDiM's fit at D = 550: a peak of 9.0 GB instead of 12.3 GB).

        Raises:
            NotPositiveDefiniteError: a covariance is not positive definite; the message names the
                class / position and its smallest eigenvalue (pass ``ridge > 0`` or use shrinkage).
        """
        # the arguments are checked before anything is released: a typo does not cost the statistics
        if not isinstance(release, bool):
            raise TypeError(f"GaussianStats.factor: release must be a bool; got {release!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"GaussianStats.factor: dtype must be a floating dtype or None; got {dtype!r}")
        ridge = check_ridge(ridge, "GaussianStats.factor")
        ddof = _check_ddof(ddof, "GaussianStats.factor")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"GaussianStats.factor: estimator must be one of {_ESTIMATORS}; got {estimator!r}")
        self._check_estimator(pooled, estimator, "factor")
        n = self._counts(pooled, "factor", ddof)
        try:
            return self._factor(estimator, ridge, pooled, dtype, ddof, n, release)
        finally:
            if release:
                self._m, self._batches, self._released, self._scratch = None, 0, True, None

    def _factor(self, estimator, ridge, pooled, dtype, ddof, n: torch.Tensor, release: bool) -> torch.Tensor:
        if pooled or self.mode == "single":
            return self._factor_of(self.covariance(estimator, pooled=pooled, ddof=ddof), estimator, 0,
                                   ridge=ridge, dtype=dtype, assume_symmetric=True)
        m = self._m
        if estimator == "empirical" and bool((n == n[0]).all()):
            # one call on the accumulators, each matrix symmetrised and scaled as the op loads it:
            # ((a + b)·0.5)·(1/n) has the bits of covariance()'s (a + b)·(0.5/n)
            return self._factor_of(m.scatter, estimator, 0, ridge=ridge, dtype=dtype, assume_symmetric=False,
                                   scale=1.0 / (float(n[0]) - ddof), release=release)
        G, D = m.scatter.shape[0], m.scatter.shape[-1]
        out = torch.empty(G, D, D, dtype=dtype or torch.float64, device=m.scatter.device)
        step = max(1, _FACTOR_CHUNK_BYTES // (D * D * 8))
        for g0 in range(0, G, step):
            sl = slice(g0, g0 + step)
            out[sl] = self._factor_of(self._estimate(estimator, False, "factor", ddof, sl)[0], estimator, g0,
                                      ridge=ridge, dtype=dtype, assume_symmetric=True)
        return out

    def _factor_of(self, matrices: torch.Tensor, estimator: str, offset: int, **kw) -> torch.Tensor:
        """whitening_factor(matrices, **kw), its NotPositiveDefiniteError naming the group (``offset`` + index)."""
        try:
            return whitening_factor(matrices, **kw)
        except NotPositiveDefiniteError as e:
            index = (offset + e.index[0],) if e.index else e.index
            where = f" of {self._group_name} {index[0]}" if index else ""
            lam = e.min_eigenvalue if e.min_eigenvalue is not None else float("nan")
            raise NotPositiveDefiniteError(
                f"GaussianStats.factor: the {estimator} covariance{where} is not positive definite "
                f"(smallest eigenvalue {lam:.6g}); pass ridge > 0 (e.g. ridge=1e-6 times the scale of the "
                f"features) or estimator='ledoit-wolf'", index=index, min_eigenvalue=e.min_eigenvalue) from None

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain state: float64 tensors ``count (G,)`` (int64), ``mean``, ``scatter``, ``cubic``, ``quartic``
        (``G`` = 1, K or P; the last three with a leading 1 when ``pooled``) plus JSON-able ``format``,
        ``version``, ``mode``, ``num_groups``, ``num_features``, ``batches``, ``pooled``, ``fourth_moments``. Save the
        tensors with safetensors and the rest as JSON metadata."""
        self._scratch = None
        state: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "mode": self.mode, "num_groups": self.num_groups,
                                 "num_features": self.num_features, "batches": self._batches, "pooled": self.pooled,
                                 "fourth_moments": self.fourth_moments}
        if self._m is not None:
            state.update({k: t.clone() for k, t in zip(_TENSORS, self._m)})
            state["count"] = self._m.count.to(torch.int64)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, device: torch.device | str | None = None) -> GaussianStats:
        """Rebuild from :meth:`state_dict`.

        Plain values may also come as strings (e.g. from safetensors metadata); tensors go to
        ``device`` (default: where they are). Shapes are checked; nothing is unpickled."""
        who = "GaussianStats.from_state_dict"
        if state.get("format") != _FORMAT or int(state.get("version", -1)) != _VERSION:
            raise ValueError(f"{who}: not a {_FORMAT} v{_VERSION} state "
                             f"(format={state.get('format')!r}, version={state.get('version')!r})")
        mode, G = str(state["mode"]), int(state["num_groups"])
        if mode not in _MODES:
            raise ValueError(f"{who}: unknown mode {mode!r}")
        D = state.get("num_features")
        D = None if D in (None, "None", "") else int(D)
        flags = {}
        for key, default in (("pooled", False), ("fourth_moments", True)):
            v = state.get(key, default)
            if v not in (True, False, "True", "False", "true", "false"):
                raise ValueError(f"{who}: {key} must be a bool; got {v!r}")
            flags[key] = v in (True, "True", "true")
        pooled = flags["pooled"]
        if pooled and mode != "classes":
            raise ValueError(f"{who}: pooled statistics have mode 'classes'; got {mode!r}")
        self = cls(D, num_classes=G if mode == "classes" else None, num_positions=G if mode == "positions" else None,
                   pooled=pooled, fourth_moments=flags["fourth_moments"])
        self._batches = int(state.get("batches", 0))
        if "mean" in state:
            if D is None:
                raise ValueError(f"{who}: tensors given but num_features is missing")
            S = 1 if pooled else G
            shapes = {"count": (G,), "mean": (G, D), "scatter": (S, D, D), "cubic": (S, D), "quartic": (S,)}
            ts = []
            for k in _TENSORS:
                t = state[k]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shapes[k]:
                    raise ValueError(f"{who}: {k} must be a tensor of shape {shapes[k]}; got {getattr(t, 'shape', type(t).__name__)}")
                ts.append(t.to(device=device, dtype=torch.float64) if device is not None else t.to(torch.float64))
            self._m = _Moments(*ts)
            self._device = ts[0].device
        elif device is not None:
            self._device = torch.device(device)
        return self

    def __repr__(self) -> str:
        n = self.count
        n_s = n if isinstance(n, int) else f"{int(n.sum())} (min {int(n.min())})"
        return (f"GaussianStats(mode={self.mode}, groups={self.num_groups}{', pooled' if self.pooled else ''}, "
                f"features={self.num_features}, count={n_s}, device={self._device}"
                f"{'' if self.fourth_moments else ', fourth_moments=False'})")

