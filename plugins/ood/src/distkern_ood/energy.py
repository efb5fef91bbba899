"""``energy``: the free energy of a classifier's logits (Liu et al. 2020), with the learned
per-sample temperature and the AbeT score (LeVine et al. 2024)."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from distkern.io import check_device

from ._common import check_choice, check_features, read_detector, save_detector

VARIANTS = ("energy", "abet")


class Energy:
    r"""Energy-based OOD score on classifier logits ``(N, C)``; higher = more OOD.

    * ``variant="energy"`` (default; Liu et al., "Energy-based Out-of-distribution Detection",
      NeurIPS 2020):

      .. math:: E(x) = -T \cdot \operatorname{logsumexp}_c (f_c(x) / T)

      with a fixed temperature ``T`` (default 1), or a per-sample learned temperature
      ``T(x)`` ``(N,)`` passed to :meth:`score` ("energy with learned temperature").
    * ``variant="abet"`` (AbeT, "Out-of-Distribution Detection & Applications With Ablated
      Learned Temperature Energy", LeVine et al. 2024): the learned-temperature energy with the
      forefront temperature removed,

      .. math:: s(x) = -\operatorname{logsumexp}_c (f_c(x) / T(x))

      where ``f(x)`` are the logit *numerators* (AbeT's cosine-similarity head output, before
      dividing by the temperature) and ``T(x)`` the extra temperature head
      (``sigmoid(BN(w·h(x) + b))`` in their code). This matches the authors' code
      (``ablated_energy``: ``log(sum(exp(logits)))`` with ``logits = numerators / T(x)``, an
      in-distribution score, negated here so that higher = more OOD) and the paper's summary
      (input-dependent learned temperature, "forefront temperature constant" removed from the
      energy); the paper's own equations were not read. If your model already returns
      ``numerators / T(x)``, pass those logits with ``temperature=None`` and ``T=1``. Without a
      per-sample temperature the AbeT score is ``E(x) / T`` (the same ranking as the energy).

    Nothing is learned from data: :meth:`fit` exists for the detector contract. ``fit(None)``
    (or with logits) selects no temperature and changes no score; given logits it only records
    the number of classes so that :meth:`score` can check the shape. :meth:`score` works on an
    unfitted detector. Choosing ``T`` on validation data (as ODIN does for its temperature) is
    not done: pick ``T`` yourself.

    Args:
        temperature: fixed ``T > 0`` used when :meth:`score` gets no per-sample temperature.
        variant: ``"energy"`` or ``"abet"``.
    """

    name = "energy"
    kind = "detector"
    distkern_api = 1
    requires_fit = False  # the energy of logits needs no fitted state

    @staticmethod
    def example_data(gen: torch.Generator):
        """For :func:`distkern.testing.check_method`: confident logits (one class well above the
        others) are in-distribution; flat logits are OOD."""
        from distkern.testing import Example

        def confident(n):
            z = torch.randn(n, 5, generator=gen)
            z[torch.arange(n), torch.randint(5, (n,), generator=gen)] += 8.0
            return z

        return Example(confident(100), None, confident(60), torch.randn(60, 5, generator=gen))

    def __init__(self, temperature: float = 1.0, variant: str = "energy"):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 < temperature < float("inf"):
            raise ValueError(f"{self.name}: temperature must be a finite float > 0; got {temperature!r}")
        self.temperature = float(temperature)
        self.variant = check_choice(self.name, "variant", variant, VARIANTS)
        self.num_classes_: Optional[int] = None

    # -- contract ---------------------------------------------------------------------------------
    def fit(self, features: Any = None, labels: Optional[torch.Tensor] = None) -> "Energy":
        """No-op fit (there are no parameters to estimate); returns ``self``.

        ``features=None``: nothing happens. Logits ``(N, C)`` (or an iterable of logit batches,
        or of ``(logits, labels)`` tuples): only their shape is checked and ``C`` is recorded as
        ``num_classes_`` for the shape checks of :meth:`score`. ``labels`` are ignored.
        """
        if features is None:
            return self
        batches = [features] if isinstance(features, torch.Tensor) else features
        if isinstance(batches, (str, bytes, dict)) or not hasattr(batches, "__iter__"):
            raise TypeError(f"{self.name}: fit() takes logits (N, C), an iterable of logit batches, or None; "
                            f"got {type(features).__name__}")
        C = None
        for b, item in enumerate(batches):
            if isinstance(item, (tuple, list)) and len(item) >= 1:
                item = item[0]
            z = check_features(self.name, "fit", item, name="logits",
                               batch=None if isinstance(features, torch.Tensor) else b)
            if C is not None and z.shape[1] != C:
                raise ValueError(f"{self.name}: fit(): batch {b} has C={z.shape[1]} logits but the earlier batches have C={C}")
            C = z.shape[1]
        if C is None:
            raise ValueError(f"{self.name}: fit() got an empty iterable of logits")
        self.num_classes_ = C
        return self

    def score(self, logits: torch.Tensor, temperature: Optional[Any] = None) -> torch.Tensor:
        """The energy (or AbeT) score of ``logits`` ``(N, C)`` → ``(N,)`` float32; higher = more OOD.

        Args:
            logits: ``(N, C)`` logits (for AbeT / learned temperature: the numerators, before
                division by ``T(x)``), any floating dtype; float64 arithmetic for float64 input,
                float32 otherwise. Stable for large logits (``torch.logsumexp``).
            temperature: ``None`` → the fixed ``T`` of the constructor; or a per-sample learned
                temperature ``T(x)``: a tensor of shape ``(N,)`` or ``(N, 1)`` (or a scalar),
                all ``> 0``.

        A row with an inf / NaN logit scores NaN or ±inf.
        """
        z = check_features(self.name, "score", logits, dim=self.num_classes_, name="logits")
        dt = torch.float64 if z.dtype == torch.float64 else torch.float32
        z = z.to(dt)
        if temperature is None:
            T = torch.tensor(self.temperature, dtype=dt, device=z.device)
            t_col = T
        else:
            T = self._check_temperature(temperature, z)
            t_col = T[:, None] if T.dim() == 1 else T
        lse = torch.logsumexp(z / t_col, dim=1)
        s = -lse if self.variant == "abet" else -(T * lse)
        return s.to(torch.float32)

    def to(self, device) -> "Energy":
        """No parameters to move (a device that cannot be used here is still refused); returns ``self``."""
        check_device(device, self.name)
        return self

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the configuration to one ``.safetensors`` file (no tensors; JSON metadata with the
        method name, format version, ``temperature``, ``variant`` and ``num_classes_``)."""
        save_detector(path, self.name, {}, {"temperature": self.temperature, "variant": self.variant},
                      {"num_classes_": self.num_classes_})

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "Energy":
        """Read a detector written by :meth:`save`; refuses a file of another method or of a newer format."""
        config, fitted, _ = read_detector(path, cls.name)
        det = cls(**config)
        C = fitted.get("num_classes_")
        det.num_classes_ = None if C is None else int(C)
        return det

    # -- helpers ------------------------------------------------------------------------------------
    def _check_temperature(self, temperature: Any, z: torch.Tensor) -> torch.Tensor:
        N = z.shape[0]
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
            T = torch.tensor(float(temperature), dtype=z.dtype, device=z.device)
        elif isinstance(temperature, torch.Tensor) and temperature.is_floating_point():
            T = temperature.to(device=z.device, dtype=z.dtype)
            if T.dim() == 2 and T.shape[1] == 1:
                T = T[:, 0]
            if T.dim() != 0 and T.shape != (N,):
                raise ValueError(f"{self.name}: score(): a per-sample temperature must have shape ({N},) or ({N}, 1) "
                                 f"to match the logits; got {tuple(temperature.shape)}")
        else:
            raise TypeError(f"{self.name}: score(): temperature must be None, a float or a floating tensor (N,); "
                            f"got {getattr(temperature, 'dtype', type(temperature).__name__)}")
        bad = ~((T > 0) & torch.isfinite(T))
        if bool(bad.any()):
            rows = torch.nonzero(bad.reshape(-1))[:5, 0].tolist()
            raise ValueError(f"{self.name}: score(): temperatures must be finite and > 0; "
                             f"{'rows ' + str(rows) if T.dim() else 'got'} {T.reshape(-1)[rows].tolist()}")
        return T

    def __repr__(self) -> str:
        return f"Energy(temperature={self.temperature}, variant={self.variant!r}, num_classes_={self.num_classes_})"

