"""``mahalanobis-ood``: class-conditional Gaussians with a tied covariance (Lee et al. 2018)."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import torch

import distkern
from distkern.io import check_device

from ._common import (ESTIMATORS, check_choice, check_features, check_num_classes, check_ridge, class_stats,
                      compute_dtype, read_detector, save_detector, shared_factor)


class MahalanobisOOD:
    r"""Mahalanobis out-of-distribution detector (Lee et al., "A Simple Unified Framework for
    Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018).

    **Fit.** From in-distribution features ``z (N, D)`` with class labels ``y (N,)`` in
    ``[0, K)``: class means ``μ_k`` and one covariance shared by all classes, the pooled
    within-class covariance

    .. math:: \Sigma = \frac{1}{N} \sum_k \sum_{i: y_i = k} (z_i - \mu_k)(z_i - \mu_k)^\top

    (what Lee et al.'s code gets from ``sklearn.covariance.EmpiricalCovariance`` on the
    class-centred features), accumulated in float64 with :class:`distkern.gaussian.GaussianStats`
    (streaming: ``fit`` also takes an iterable of ``(z, y)`` batches). ``estimator="ledoit-wolf"``
    or ``"oas"`` shrinks Σ, treating the class-centred residuals as the data. The precision is
    never inverted: ``(Σ + ridge·I)⁻¹ = L Lᵀ`` with ``L`` lower-triangular (Cholesky, float64).

    **Score.** The minimum over classes of the *squared* Mahalanobis distance,

    .. math:: s(z) = \min_k (z - \mu_k)^\top (\Sigma + \text{ridge}\,I)^{-1} (z - \mu_k)

    through the fused :func:`distkern.mahalanobis_k` (``reduce="min"``): no ``(N, K, D)``
    tensor. Higher = more OOD. Relation to pytorch-ood's ``detector.Mahalanobis``
    (``fit_features`` / ``predict_features``), read from its source: it also returns the
    minimum *squared* distance, but (a) multiplied by ½ (its per-class term is
    ``-0.5·d²`` and the score ``-max_k``), and (b) with the *un-normalised* within-class
    scatter ``S = N·Σ`` plus ``eps·I`` (eps = 1e-6) as covariance, inverted with ``pinv``.
    Hence ``pytorch_ood_score = score / (2N)`` exactly when ``ridge = eps / N`` (same
    ranking, same AUROC; with the default ``ridge=1e-6`` on Σ the two differ only through
    the tiny diagonal loading). It also averages ``(N, C, H, W)`` features over H×W, as
    :meth:`score_inputs` does here. Lee et al.'s layer ensemble (a logistic regression over
    the scores of several layers, tuned on OOD validation data) is not part of this class:
    fit one detector per layer and combine their scores yourself.

    Args:
        num_classes: K; ``None`` (default) takes ``max(label) + 1``. Every class must occur.
        estimator: ``"empirical"`` (default; Lee et al.), ``"ledoit-wolf"`` or ``"oas"``.
        ridge: added to the diagonal of Σ before factorising (default 1e-6, as pytorch-ood's
            ``eps`` but on Σ rather than on the scatter ``N·Σ``), ``≥ 0``.

    Attributes (after ``fit``):
        means: ``(K, D)`` float64 class means.
        factor: ``(D, D)`` float64 lower-triangular ``L``, ``(Σ + ridge·I)⁻¹ = L Lᵀ``.
        class_counts_: ``(K,)`` int64 samples per class; ``n_samples_``; ``shrinkage_`` (0 for
        ``"empirical"``).
    """

    name = "mahalanobis-ood"
    kind = "detector"
    distkern_api = 1

    def __init__(self, num_classes: Optional[int] = None, estimator: str = "empirical", ridge: float = 1e-6):
        self.num_classes = check_num_classes(self.name, num_classes)
        self.estimator = check_choice(self.name, "estimator", estimator, ESTIMATORS)
        self.ridge = check_ridge(self.name, ridge)
        self.means: Optional[torch.Tensor] = None
        self.factor: Optional[torch.Tensor] = None
        self.class_counts_: Optional[torch.Tensor] = None
        self.n_samples_: int = 0
        self.shrinkage_: float = 0.0
        self._cache: Optional[tuple] = None

    # -- contract ---------------------------------------------------------------------------------
    def fit(self, features: Any, labels: Optional[torch.Tensor] = None) -> "MahalanobisOOD":
        """Fit class means and the shared covariance.

        Args:
            features: in-distribution features ``(N, D)`` (finite, any floating dtype), or an
                iterable of ``(x (B, D), y (B,))`` batches (a DataLoader of features) — then
                ``labels`` must be ``None``.
            labels: integer class labels ``(N,)`` in ``[0, K)``; required with a tensor.

        Returns ``self``. Raises ``ValueError`` (shapes, missing / out-of-range labels, a class
        without samples, inf / NaN rows — named), ``TypeError`` (non-floating features,
        non-integer labels) and :class:`distkern.gaussian.NotPositiveDefiniteError` when
        Σ + ridge·I cannot be factorised.
        """
        # one within-class scatter, not K, unless Ledoit-Wolf needs each class's (its fourth moments)
        stats = class_stats(self.name, features, labels, self.num_classes, pooled=self.estimator != "ledoit-wolf")
        factor, shrinkage = shared_factor(self.name, stats, self.estimator, self.ridge)
        self.means = stats.mean
        self.factor = factor
        self.class_counts_ = stats.count.cpu()
        self.n_samples_ = int(self.class_counts_.sum())
        self.shrinkage_ = shrinkage
        self._cache = None
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Minimum squared Mahalanobis distance to the class means: ``(M, D)`` → ``(M,)`` float32
        on the features' device; higher = more OOD. Computed in float64 for float64 features,
        float32 otherwise. A row with an inf / NaN scores NaN (no host sync to check)."""
        return self._min(features, "score").values.to(torch.float32)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Index of the nearest class mean (smallest Mahalanobis distance), ``(M, D)`` → ``(M,)`` int64."""
        return self._min(features, "predict").indices

    def perturb(self, inputs: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor], epsilon: float = 0.002,
                *, input_std: Optional[Sequence[float]] = None) -> torch.Tensor:
        r"""Lee et al.'s input pre-processing: ``x̃ = x − ε·sign(∇ₓ min_k d²_k(model(x)))``.

        One signed-gradient step that *decreases* the distance to the nearest class mean
        (in-distribution inputs move more than OOD ones). The gradient flows through the
        fused op's autograd with respect to its input; the model's parameter ``.grad`` are
        not touched. Put the model in ``eval()`` mode first.

        Args:
            inputs: the model's input batch ``(N, ...)``, floating.
            model: maps ``inputs`` to features ``(N, D)``, or to feature maps ``(N, D, *spatial)``
                that are averaged over the spatial dimensions (as Lee et al. and pytorch-ood do).
            epsilon: step size ``ε ≥ 0`` (Lee et al. tune it on validation data; 0.002 is
                pytorch-ood's default).
            input_std: per-channel (dimension 1) standard deviations of the input normalisation;
                the signed gradient is divided by them, as in Lee et al.'s code, so that ε is a
                step in un-normalised pixel units.

        Returns ``x̃``, shape and dtype of ``inputs``, detached.
        """
        self._require_fit("perturb")
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            raise TypeError(f"{self.name}: perturb() takes a floating-point input tensor; "
                            f"got {getattr(inputs, 'dtype', type(inputs).__name__)}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < float("inf"):
            raise ValueError(f"{self.name}: epsilon must be a finite float >= 0; got {epsilon!r}")
        with torch.inference_mode(False), torch.enable_grad():
            x = inputs.detach().clone().requires_grad_(True)
            z = self._model_features(model, x, "perturb")
            if not z.requires_grad:
                raise ValueError(f"{self.name}: perturb(): the model's output does not depend differentiably on its "
                                 "input (no gradient path); input pre-processing needs one")
            means, factor = self._params(compute_dtype(z), z.device)
            d2 = distkern.mahalanobis_k(z.to(compute_dtype(z)), means, factor, reduce="min").values
            (grad,) = torch.autograd.grad(d2.sum(), x)
        step = grad.sign()
        if input_std is not None:
            std = torch.as_tensor(input_std, dtype=step.dtype, device=step.device).reshape(-1)
            if inputs.dim() < 2 or std.numel() != inputs.shape[1] or not bool((std > 0).all()):
                raise ValueError(f"{self.name}: input_std must hold {inputs.shape[1] if inputs.dim() > 1 else '?'} "
                                 f"positive values (one per channel, dimension 1 of the inputs); got {input_std!r}")
            step = step / std.view(1, -1, *([1] * (inputs.dim() - 2)))
        return (inputs.detach() - epsilon * step).to(inputs.dtype)

    def score_inputs(self, inputs: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor], epsilon: float = 0.002,
                     *, input_std: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Score with input pre-processing: :meth:`score` of ``model(perturb(inputs, model, epsilon))``.

        ``(N, ...)`` inputs → ``(N,)`` float32; ``epsilon=0`` scores ``model(inputs)`` unchanged.
        Costs one forward + backward and a second forward pass of the model."""
        x_tilde = self.perturb(inputs, model, epsilon, input_std=input_std)
        with torch.no_grad():
            return self.score(self._model_features(model, x_tilde, "score_inputs"))

    def to(self, device) -> "MahalanobisOOD":
        """Move the fitted parameters to ``device``; returns ``self``."""
        device = check_device(device, self.name)
        if self.means is not None:
            self.means, self.factor = self.means.to(device), self.factor.to(device)
        self._cache = None
        return self

    # -- persistence (safetensors + JSON, no pickle) ------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector to one ``.safetensors`` file: ``means``, ``factor`` (float64),
        ``class_counts``, and JSON metadata (method name, format version, config, fitted values)."""
        self._require_fit("save", "nothing to save: ")
        save_detector(path, self.name, {"means": self.means, "factor": self.factor, "class_counts": self.class_counts_},
                      {"num_classes": self.num_classes, "estimator": self.estimator, "ridge": self.ridge},
                      {"n_samples_": self.n_samples_, "shrinkage_": self.shrinkage_})

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "MahalanobisOOD":
        """Read a detector written by :meth:`save`; refuses a file of another method or of a newer format."""
        config, fitted, t = read_detector(path, cls.name)
        det = cls(**config)
        means, factor = t.get("means"), t.get("factor")
        if means is None or factor is None or means.dim() != 2 or factor.shape != (means.shape[1],) * 2:
            raise ValueError(f"{cls.name}: {os.fspath(path)!r} lacks means (K, D) / factor (D, D) tensors")
        det.means, det.factor = means, factor
        det.class_counts_ = t.get("class_counts")
        det.n_samples_, det.shrinkage_ = int(fitted.get("n_samples_", 0)), float(fitted.get("shrinkage_", 0.0))
        return det.to(device)

    # -- helpers ------------------------------------------------------------------------------------
    def _require_fit(self, where: str, what: str = "") -> None:
        if self.means is None:
            raise RuntimeError(f"{self.name}: {what}{where}() called before fit(); fit the detector on "
                               "in-distribution features and labels first")

    def _params(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.means.to(device=device, dtype=dtype), self.factor.to(device=device, dtype=dtype))
        return self._cache[1], self._cache[2]

    def _min(self, features: torch.Tensor, where: str):
        self._require_fit(where)
        x = check_features(self.name, where, features, dim=self.means.shape[1])
        dt = compute_dtype(x)
        means, factor = self._params(dt, x.device)
        return distkern.mahalanobis_k(x.to(dt), means, factor, reduce="min")

    def _model_features(self, model: Callable, x: torch.Tensor, where: str) -> torch.Tensor:
        z = model(x)
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{self.name}: {where}(): the model must return a tensor (N, D); got {type(z).__name__}")
        if z.dim() > 2:
            z = z.flatten(2).mean(2)  # (N, C, *spatial) → (N, C), as Lee et al.
        return check_features(self.name, where, z, dim=self.means.shape[1], name="model outputs")

    def __repr__(self) -> str:
        state = (f"fitted on {self.n_samples_} samples, K={self.means.shape[0]}, D={self.means.shape[1]}"
                 if self.means is not None else "not fitted")
        return f"MahalanobisOOD(estimator={self.estimator!r}, ridge={self.ridge}; {state})"
