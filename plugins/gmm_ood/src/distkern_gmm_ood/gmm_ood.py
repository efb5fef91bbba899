"""``gmm-ood``: out-of-distribution detection with a Gaussian mixture per in-distribution class.

After "Hierarchical Visual Categories Modeling: A Joint Representation Learning and Density
Estimation Framework for Out-of-Distribution Detection" (Li et al.): each in-distribution class
is modelled by its own mixture of Gaussians (the sub-concepts of a visual category), and an
input's in-distribution score aggregates the Mahalanobis-based terms of the components over
components and classes. Here the mixtures are fitted post hoc to given features by EM
(:func:`distkern_gmm_ood.em.fit_gmm`, on the features' device); the paper's joint training of the
representation is not part of this detector.

Scores: the class log-likelihood
``log p_c(x) = logsumexp_k(log w_ck − ½ log det 2πΣ_ck − ½ d²_ck(x))`` is one fused
:func:`distkern.gmm_log_likelihood` pass per class (no ``(N, K)`` tensor); the in-distribution
score is ``max_c log p_c(x)`` (``aggregate="max"``, default) or ``log Σ_c π_c p_c(x)``
(``aggregate="logsumexp"``: the mixture of all class mixtures with the class frequencies as
priors, one fused pass over all components). The OOD score is its negative.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any, Optional

import torch

import distkern
from distkern.io import check_device, read_model, write_model
from distkern.gaussian import NotPositiveDefiniteError

from .em import INITS, GMMConvergenceWarning, fit_gmm

FORMAT_VERSION = 1
_AGGREGATES = ("max", "logsumexp")
# safetensors key -> attribute holding it
_TENSORS = {"means": "means", "factors": "factors", "log_weights": "log_weights", "component_class": "component_class",
            "classes": "classes_", "class_log_prior": "class_log_prior", "class_counts": "class_counts"}


def _features(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gmm-ood: {what} features must be a tensor of shape (N, D); got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"gmm-ood: {what} features must be (N, D); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"gmm-ood: {what} features must be floating; got {x.dtype}")
    return x.detach()


def _collect(batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate an iterable of ``(features, labels)`` batches (a DataLoader)."""
    xs, ys = [], []
    for i, b in enumerate(batches):
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(f"gmm-ood: fit() needs class labels: an iterable must yield (features, labels) pairs; "
                             f"batch {i} is a {type(b).__name__}")
        xs.append(_features(b[0], "training"))
        ys.append(torch.as_tensor(b[1]).reshape(-1).to(xs[-1].device))
    if not xs:
        raise ValueError("gmm-ood: fit() got no data")
    return torch.cat(xs), torch.cat(ys)


class GMMOOD:
    """OOD detector: a full-covariance Gaussian mixture per in-distribution class.

    Args:
        components_per_class: mixture components per class (default 4). A class with ``n_c``
            samples gets ``max(1, min(components_per_class, n_c // min_samples_per_component))``
            components, so that a component has on average at least
            ``min_samples_per_component`` samples (with the default 2: a class of 2–3 samples
            gets 1 component, 4–5 samples 2, …); ``n_components_`` records the numbers used.
        aggregate: ``"max"`` (default): in-distribution score ``max_c log p_c(x)``;
            ``"logsumexp"``: ``log Σ_c π_c p_c(x)`` with ``π_c`` the training class frequencies.
        covariance_type: ``"full"`` only (other types are refused; :func:`~distkern_gmm_ood.em.fit_gmm`
            itself supports them).
        reg_covar: added to each covariance's diagonal (sklearn's convention; raise it for
            high-dimensional features with few samples per class).
        max_iter, tol, n_init, init: EM settings per class, as in
            :func:`~distkern_gmm_ood.em.fit_gmm` (sklearn's semantics).
        seed: seeds one CPU ``torch.Generator`` used for the classes in sorted label order:
            the same seed and data give identical parameters.
        min_samples_per_component: see ``components_per_class`` (``≥ 1``).

    Shapes: ``fit(features (N, D), labels (N,) integer)``; ``score`` / ``predict`` take
    ``(M, D)`` features on any device (the model is moved with :meth:`to`). Fitted state (float64,
    on the training features' device): ``classes_ (C,)`` int64 sorted labels; ``means (Kt, D)``,
    ``factors (Kt, D, D)`` lower-triangular precision factors (``Σ⁻¹ = L Lᵀ``), ``log_weights
    (Kt,)`` and ``component_class (Kt,)`` (index into ``classes_``) for the ``Kt = Σ_c K_c``
    components, class by class; ``class_log_prior (C,)``. Memory is ``Kt·D²`` float64 (plus a
    float32 copy when scoring float32 features).
    """

    name = "gmm-ood"
    kind = "detector"
    distkern_api = 1

    def __init__(self, components_per_class: int = 4, aggregate: str = "max", covariance_type: str = "full",
                 reg_covar: float = 1e-6, max_iter: int = 100, tol: float = 1e-3, n_init: int = 1,
                 init: str = "kmeans", seed: int = 0, min_samples_per_component: int = 2):
        if covariance_type != "full":
            raise ValueError(f"gmm-ood: covariance_type {covariance_type!r} is not supported: the detector fits full "
                             "covariances only (distkern_gmm_ood.em.fit_gmm supports 'tied', 'diag' and 'spherical')")
        if int(components_per_class) < 1:
            raise ValueError(f"gmm-ood: components_per_class must be >= 1; got {components_per_class}")
        if aggregate not in _AGGREGATES:
            raise ValueError(f"gmm-ood: aggregate must be one of {_AGGREGATES}; got {aggregate!r}")
        if not reg_covar >= 0:
            raise ValueError(f"gmm-ood: reg_covar must be >= 0; got {reg_covar}")
        if int(max_iter) < 0 or not tol >= 0 or int(n_init) < 1:
            raise ValueError(f"gmm-ood: need max_iter >= 0, tol >= 0 and n_init >= 1; got {max_iter}, {tol}, {n_init}")
        if init not in INITS:
            raise ValueError(f"gmm-ood: init must be one of {INITS}; got {init!r}")
        if int(min_samples_per_component) < 1:
            raise ValueError(f"gmm-ood: min_samples_per_component must be >= 1; got {min_samples_per_component}")
        self.components_per_class, self.aggregate, self.covariance_type = int(components_per_class), aggregate, covariance_type
        self.reg_covar, self.max_iter, self.tol, self.n_init = float(reg_covar), int(max_iter), float(tol), int(n_init)
        self.init, self.seed, self.min_samples_per_component = init, int(seed), int(min_samples_per_component)
        self._reset()

    def _reset(self) -> None:
        self.classes_: Optional[torch.Tensor] = None
        self.means = self.factors = self.log_weights = self.component_class = None
        self.class_log_prior = self.class_counts = None
        self.n_components_: list[int] = []
        self.converged_: list[bool] = []
        self.n_iter_: list[int] = []
        self.lower_bound_: list[float] = []
        self._cache: dict = {}

    @property
    def fitted(self) -> bool:
        return self.classes_ is not None

    @property
    def n_features_(self) -> int:
        self._check_fitted("n_features_")
        return int(self.means.shape[1])

    # -- fit ---------------------------------------------------------------------------------------
    def fit(self, features: Any, labels: Any = None) -> "GMMOOD":
        """Fit one Gaussian mixture per class.

        Args:
            features: ``(N, D)`` floating tensor (any device: EM runs there, in float64), or an
                iterable (a DataLoader) of ``(features, labels)`` batches, concatenated first.
            labels: ``(N,)`` integer class labels (any values; a float tensor of whole numbers is
                accepted). Required: the detector models each class separately.

        Raises:
            ValueError: no labels, labels of the wrong length or not integral, non-finite
                features (the rows are named), a class with fewer than 2 samples (named).
            distkern.gaussian.NotPositiveDefiniteError: a component's covariance is singular
                (``reg_covar=0`` with collapsed samples); names the class and component.
        """
        if labels is None:
            if isinstance(features, torch.Tensor):
                raise ValueError("gmm-ood: fit() needs class labels: fit(features (N, D), labels (N,)); the detector "
                                 "models each in-distribution class by its own Gaussian mixture")
            x, y = _collect(features)
        else:
            x = _features(features, "training")
            y = torch.as_tensor(labels).to(x.device)
        N, D = x.shape
        if y.dim() != 1 or y.shape[0] != N:
            raise ValueError(f"gmm-ood: labels must be (N,) = ({N},) to match the features; got shape {tuple(y.shape)}")
        if y.is_floating_point():
            if not bool((torch.isfinite(y) & (y == y.round())).all()):
                raise ValueError("gmm-ood: labels must be integer class labels; got non-integral floats")
        elif y.is_complex():
            raise ValueError(f"gmm-ood: labels must be integer class labels; got {y.dtype}")
        y = y.to(torch.int64)
        bad = ~torch.isfinite(x).all(1)
        if bool(bad.any()):
            rows = torch.nonzero(bad)[:, 0]
            raise ValueError(f"gmm-ood: training features have inf or NaN entries in {rows.numel()} rows, "
                             f"e.g. rows {rows[:10].tolist()}")
        if N == 0:
            raise ValueError("gmm-ood: fit() got no samples")
        classes, counts = torch.unique(y, sorted=True, return_counts=True)
        small = counts < 2
        if bool(small.any()):
            few = [(int(c), int(n)) for c, n in zip(classes[small].tolist(), counts[small].tolist())]
            raise ValueError(f"gmm-ood: every class needs at least 2 samples; class(es) with fewer (label, count): {few[:10]}")

        g = torch.Generator()
        g.manual_seed(self.seed)
        means, factors, log_w, comp_class = [], [], [], []
        n_comp, conv, n_iter, lb = [], [], [], []
        for i, (c, n_c) in enumerate(zip(classes.tolist(), counts.tolist())):
            k = max(1, min(self.components_per_class, n_c // self.min_samples_per_component))
            try:
                fit = fit_gmm(x[y == c], k, covariance_type="full", reg_covar=self.reg_covar, max_iter=self.max_iter,
                              tol=self.tol, n_init=self.n_init, seed=g, init=self.init, warn=False)
            except NotPositiveDefiniteError as e:
                raise NotPositiveDefiniteError(f"gmm-ood: class {c}: {e}", index=(i,) + tuple(e.index or ()),
                                               min_eigenvalue=e.min_eigenvalue) from None
            means.append(fit.means)
            factors.append(fit.factors)
            log_w.append(fit.weights.log())
            comp_class.append(torch.full((k,), i, dtype=torch.int64, device=x.device))
            n_comp.append(k)
            conv.append(fit.converged)
            n_iter.append(fit.n_iter)
            lb.append(fit.lower_bound)
        self._reset()
        self.classes_ = classes
        self.class_counts = counts
        self.class_log_prior = (counts.to(torch.float64) / N).log()
        self.means, self.factors = torch.cat(means), torch.cat(factors)
        self.log_weights, self.component_class = torch.cat(log_w), torch.cat(comp_class)
        self.n_components_, self.converged_, self.n_iter_, self.lower_bound_ = n_comp, conv, n_iter, lb
        if self.max_iter > 0 and not all(conv):
            late = [int(c) for c, ok in zip(classes.tolist(), conv) if not ok]
            warnings.warn(f"gmm-ood: EM did not converge in max_iter={self.max_iter} iterations for class(es) {late[:10]}"
                          f"{' …' if len(late) > 10 else ''}; increase max_iter or tol", GMMConvergenceWarning, stacklevel=2)
        return self

    # -- scores ------------------------------------------------------------------------------------
    def _check_fitted(self, what: str) -> None:
        if not self.fitted:
            raise RuntimeError(f"gmm-ood: {what} called before fit(); fit the detector on labelled in-distribution features first")

    def _input(self, features: Any, what: str) -> torch.Tensor:
        self._check_fitted(f"{what}()")
        x = _features(features, what)
        if x.shape[1] != self.means.shape[1]:
            raise ValueError(f"gmm-ood: features have D={x.shape[1]} but the detector was fitted with D={self.means.shape[1]}")
        return x

    def _params(self, x: torch.Tensor):
        """Parameters in the scoring dtype (float64 for float64 features, else float32) on x's device."""
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (x.device, dt)
        p = self._cache.get(key)
        if p is None:
            lw = self.log_weights.to(x.device)
            lw_all = lw + self.class_log_prior.to(x.device)[self.component_class.to(x.device)]
            p = (self.means.to(x.device, dt), self.factors.to(x.device, dt), lw.to(dt), lw_all.to(dt))
            self._cache = {key: p}  # keep one copy only
        return p

    def _slices(self) -> list[tuple[int, int]]:
        ends = torch.tensor(self.n_components_).cumsum(0).tolist()
        return list(zip([0] + ends[:-1], ends))

    def class_log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` log-density ``log p_c(x)`` of each row under each class's mixture (column
        order ``classes_``); float64 for float64 features, else float32. A non-finite row gives NaN."""
        return self._class_ll(features, "class_log_likelihood")

    def _class_ll(self, features: torch.Tensor, what: str) -> torch.Tensor:
        x = self._input(features, what)  # errors name the method the user called
        m, L, lw, _ = self._params(x)
        cols = [distkern.gmm_log_likelihood(x, m[s:e], L[s:e], lw[s:e]) for s, e in self._slices()]
        return torch.stack(cols, 1)

    def in_distribution_score(self, features: torch.Tensor, _what: str = "in_distribution_score") -> torch.Tensor:
        """``(N,)`` in-distribution score (higher = more in-distribution), in the dtype of
        :meth:`class_log_likelihood`: ``max_c log p_c(x)`` or ``log Σ_c π_c p_c(x)`` (``aggregate``)."""
        if self.aggregate == "max":
            return self._class_ll(features, _what).max(1).values
        x = self._input(features, _what)
        m, L, _, lw_all = self._params(x)
        return distkern.gmm_log_likelihood(x, m, L, lw_all)  # one fused pass over all classes' components

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """OOD score ``(N,)`` float32 for features ``(N, D)``: ``−in_distribution_score``;
        higher = more out-of-distribution. A row with inf or NaN scores NaN (no host sync)."""
        return (-self.in_distribution_score(features, "score")).to(torch.float32)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` int64: the label (from ``classes_``) whose mixture gives the highest likelihood."""
        ll = self._class_ll(features, "predict")
        return self.classes_.to(ll.device)[ll.argmax(1)]

    def to(self, device) -> "GMMOOD":
        """Move the fitted parameters to ``device`` (in place); returns ``self``."""
        device = check_device(device, self.name)
        if self.fitted:
            for attr in _TENSORS.values():
                setattr(self, attr, getattr(self, attr).to(device))
        self._cache = {}
        return self

    # -- persistence (safetensors + JSON, no pickle) -----------------------------------------------
    def _config(self) -> dict:
        return {"components_per_class": self.components_per_class, "aggregate": self.aggregate,
                "covariance_type": self.covariance_type, "reg_covar": self.reg_covar, "max_iter": self.max_iter,
                "tol": self.tol, "n_init": self.n_init, "init": self.init, "seed": self.seed,
                "min_samples_per_component": self.min_samples_per_component}

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector to one ``.safetensors`` file: the float64 parameters as
        tensors, configuration and fit diagnostics as JSON metadata."""
        self._check_fitted("save()")
        tensors = {key: getattr(self, attr) for key, attr in _TENSORS.items()}
        write_model(path, self.name, tensors, config=self._config(), format_version=FORMAT_VERSION,
                    fitted={"n_components_": self.n_components_, "converged_": self.converged_,
                            "n_iter_": self.n_iter_, "lower_bound_": self.lower_bound_})

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "GMMOOD":
        """Read a detector written by :meth:`save` onto ``device``; refuses a file of another
        method, of a newer format, or with missing / inconsistent tensors."""
        p = os.fspath(path)
        config, fitted, tensors = read_model(p, cls.name, format_version=FORMAT_VERSION, package="distkern-gmm-ood")
        try:
            det = cls(**config)
            t = {n: tensors[n] for n in _TENSORS}
            n_comp = [int(k) for k in fitted["n_components_"]]
            det.converged_ = [bool(v) for v in fitted["converged_"]]
            det.n_iter_ = [int(v) for v in fitted["n_iter_"]]
            det.lower_bound_ = [float(v) for v in fitted["lower_bound_"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"gmm-ood: {p!r} is damaged or incomplete ({type(e).__name__}: {e})") from None
        Kt, C = sum(n_comp), len(n_comp)
        m, L = t["means"], t["factors"]
        ok = (m.dim() == 2 and m.shape[0] == Kt and tuple(L.shape) == (Kt, m.shape[1], m.shape[1])
              and tuple(t["log_weights"].shape) == (Kt,) and tuple(t["component_class"].shape) == (Kt,)
              and all(tuple(t[n].shape) == (C,) for n in ("classes", "class_log_prior", "class_counts"))
              and torch.equal(t["component_class"], torch.repeat_interleave(torch.arange(C), torch.tensor(n_comp, dtype=torch.int64))))
        if not ok:
            raise ValueError(f"gmm-ood: {p!r} has inconsistent tensor shapes for {C} classes / {Kt} components")
        for key, attr in _TENSORS.items():
            setattr(det, attr, t[key])
        det.n_components_ = n_comp
        return det.to(device)

    def __repr__(self) -> str:
        state = (f"{len(self.n_components_)} classes, {sum(self.n_components_)} components, D={self.means.shape[1]}"
                 if self.fitted else "not fitted")
        return f"GMMOOD(components_per_class={self.components_per_class}, aggregate={self.aggregate!r}; {state})"
