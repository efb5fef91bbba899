"""``padim``: one Gaussian per feature-map position, Mahalanobis distance map as anomaly map."""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

import distkern
from distkern.io import check_device, normal_only, read_model, write_model
from distkern.gaussian import GaussianStats, NotPositiveDefiniteError

FORMAT_VERSION = 1

_FACTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fp64 bytes of one update chunk (B·P·D·8) and of one factorisation chunk (P·D²·8); bounds the
# temporaries, not the statistics themselves (P·D² float64, see the class docstring).
_CHUNK_BYTES = 1 << 28

Levels = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def blur_kernel_size(sigma: float) -> int:
    """Kernel size of anomalib's ``GaussianBlur2d`` for ``sigma``: ``2·int(4σ + 0.5) + 1``."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def gaussian_kernel1d(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of size :func:`blur_kernel_size` (kornia's ``get_gaussian_kernel1d``)."""
    k = blur_kernel_size(sigma)
    x = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-x * x / (2.0 * sigma * sigma))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _reflect_index(n: int, pad: int, device) -> torch.Tensor:
    """Source indices of a reflect-padded axis (``F.pad(mode="reflect")`` when ``pad < n``).

    Beyond one reflection the pattern continues periodically (period ``2(n − 1)``), where
    ``F.pad`` / kornia would raise; an axis of length 1 is replicated."""
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    j = torch.remainder(i, period)
    return torch.where(j >= n, period - j, j)


def _resize_nearest(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``F.interpolate(t, size=(H, W), mode="nearest")``, the same bits. Where both factors are powers of
    two (PaDiM's 56/28 and 56/14; torch's source index ``⌊i·h/H⌋`` is then exact) each value is repeated
    by a broadcast copy: 3.5–6 ms where interpolate took 24–33 ms for 32 × 33 maps of 28² → 56²."""
    h, w = t.shape[-2:]
    fh, fw = H // h if h else 0, W // w if w else 0
    if h and w and fh * h == H and fw * w == W and fh & (fh - 1) == 0 and fw & (fw - 1) == 0:
        B, C = t.shape[:2]
        return t[:, :, :, None, :, None].expand(B, C, h, fh, w, fw).reshape(B, C, H, W)
    return F.interpolate(t, size=(H, W), mode="nearest")


_BLUR_MATRIX_MAX = 1024  # longest axis blurred as a product with its (n, n) blur matrix


def _blur_matrix(k: torch.Tensor, n: int) -> torch.Tensor:
    """``M (n, n)`` with ``(x @ M)[j] = Σ_t k[t]·x[reflect(j − pad + t)]``: the 1-D blur of an axis of length
    ``n``, its reflect padding folded in (reflected taps summed into the rows they read)."""
    pad = k.numel() // 2
    src = _reflect_index(n, pad, k.device)  # (n + 2·pad,) source of each padded position
    cols = torch.arange(n, device=k.device)
    rows = src[cols[:, None] + torch.arange(k.numel(), device=k.device)]  # (n, taps): x index of tap t at j
    m = torch.zeros(n, n, dtype=k.dtype, device=k.device)
    m.index_put_((rows.reshape(-1), cols.repeat_interleave(k.numel())), k.repeat(n), accumulate=True)
    return m


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(B, 1, H, W)`` maps as anomalib's ``GaussianBlur2d(sigma, channels=1)``.

    Kernel size ``2·int(4σ + 0.5) + 1``, normalised kernel, reflect padding ("same" output), separable
    (the 2-D kernel is the outer product of the 1-D one). Each axis up to 1024 long is blurred as a
    matrix product with its ``(n, n)`` blur matrix, the padding folded in: at 224 × 224 that is ~7× the
    FLOPs of the 33 taps but runs as GEMMs, where the one-channel convolutions ran at ~3 GFLOP/s
    (32 maps: 79 ms through conv2d on a 2-core CPU). Longer axes: two 1-D convolutions."""
    k = gaussian_kernel1d(sigma, dtype=maps.dtype, device=maps.device)
    pad = k.numel() // 2
    H, W = maps.shape[-2:]
    if max(H, W) <= _BLUR_MATRIX_MAX:
        mw = _blur_matrix(k, W)
        mh = mw if H == W else _blur_matrix(k, H)
        out = maps @ mw  # along W
        return (out.transpose(-1, -2) @ mh).transpose(-1, -2).contiguous()  # along H
    out = maps.index_select(-1, _reflect_index(W, pad, maps.device))
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    out = out.index_select(-2, _reflect_index(H, pad, maps.device))
    return F.conv2d(out, k.view(1, 1, -1, 1))


def _is_levels(obj: Any) -> bool:
    """One batch of feature maps: a tensor, a mapping of tensors, or a list/tuple of tensors."""
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return all(isinstance(v, torch.Tensor) for v in obj.values())
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj)


class PaDiM:
    r"""PaDiM, "a Patch Distribution Modeling Framework for Anomaly Detection and Localization"
    (Defard et al., ICPR 2020), with anomalib's formulas (``models/image/padim``).

    **Features.** One feature map ``(B, C, H, W)`` or multi-level maps — a list / tuple
    ``[(B, C_1, H_1, W_1), (B, C_2, H_2, W_2), ...]`` or a dict (its values in order, e.g. the
    output of torchvision's ``create_feature_extractor``). Levels are resized to the first map's
    ``H × W`` with nearest interpolation and concatenated along channels (anomalib's
    ``generate_embedding``); then ``num_features`` of the ``C = ΣC_l`` channels, drawn at random
    once (``seed``) at the first :meth:`fit`, are kept: ``D = num_features`` (all ``C`` if None).
    The embedding has ``P = H·W`` positions of ``D`` features.

    **Fit.** Per position ``p``: mean ``μ_p`` and unbiased covariance
    ``Σ_p = S_p / (n − 1) + regularization·I``, accumulated in float64 by
    :class:`distkern.gaussian.GaussianStats` batch by batch (a DataLoader's training set never
    has to fit in memory; the statistics hold ``P·D²`` float64 values). Stored: ``mean (P, D)``
    float32 and the lower-triangular ``factor (P, D, D)`` with ``Σ_p⁻¹ = L_p L_pᵀ`` in
    ``factor_dtype`` (computed in float64 by Cholesky, no explicit inverse).

    **Score.** ``d_bp = sqrt(max(‖L_pᵀ(x_bp − μ_p)‖², 0))`` by :func:`distkern.mahalanobis_pos`
    (the factors are read in place) → ``(B, H, W)``; bilinearly upsampled to ``image_size`` if
    given; Gaussian blur ``σ = blur_sigma`` (kernel ``2·int(4σ + 0.5) + 1``, reflect padding) →
    the anomaly map. Image score = its maximum. Higher = more anomalous.

    Args:
        num_features: channels kept by random selection (anomalib / the paper: 100 of resnet18's
            448, 550 of wide_resnet50_2's 1792); ``None`` keeps all channels.
        seed: seed of the ``torch.Generator`` drawing the channels (``None``: a random seed).
        regularization: added to each covariance's diagonal (anomalib: 0.01), ``≥ 0``.
        blur_sigma: σ of the Gaussian blur of the map (anomalib: 4); 0 disables the blur.
        image_size: default ``(height, width)`` the maps are upsampled to (anomalib: the input
            image size); ``None``: the feature map's ``H × W``. A call's ``image_size`` overrides it.
        factor_dtype: ``torch.float32`` (default), ``torch.bfloat16`` or ``torch.float16`` for
            the stored factors (bf16 halves their memory: 1.9 GB instead of 3.8 GB at P = 3136,
            D = 550; the op reads them directly, arithmetic stays float32).

    Example::

        PaDiM = distkern.methods.get("padim")
        det = PaDiM(num_features=100).fit(train_loader)       # yields [layer1, layer2, layer3] maps
        maps = det.anomaly_map([f1, f2, f3], image_size=(224, 224))   # (B, 224, 224)
        scores = det.score([f1, f2, f3], image_size=(224, 224))       # (B,)
    """

    name = "padim"
    kind = "detector"
    distkern_api = 1

    @staticmethod
    def example_data(gen: torch.Generator):
        """A small synthetic problem for :func:`distkern.testing.check_method`: (B, 6, 4, 4) feature
        maps around per-position means; anomalous maps carry a shifted 2×2 patch."""
        from distkern.testing import Example

        mu = 2.0 * torch.randn(1, 6, 4, 4, generator=gen)

        def draw(n):
            return mu + torch.randn(n, 6, 4, 4, generator=gen)

        anomalous = draw(30)
        anomalous[:, :, 1:3, 1:3] += 4.0
        return Example(draw(80), None, draw(30), anomalous)

    def __init__(self, num_features: Optional[int] = None, *, seed: Optional[int] = 0,
                 regularization: float = 0.01, blur_sigma: float = 4.0,
                 image_size: Optional[Sequence[int]] = None, factor_dtype: torch.dtype = torch.float32):
        if num_features is not None and (not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1):
            raise ValueError(f"padim: num_features must be a positive int or None; got {num_features!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"padim: seed must be an int or None; got {seed!r}")
        if not (isinstance(regularization, (int, float)) and regularization >= 0 and math.isfinite(regularization)):
            raise ValueError(f"padim: regularization must be a finite number >= 0; got {regularization!r}")
        if not (isinstance(blur_sigma, (int, float)) and blur_sigma >= 0 and math.isfinite(blur_sigma)):
            raise ValueError(f"padim: blur_sigma must be a finite number >= 0 (0 disables the blur); got {blur_sigma!r}")
        if isinstance(factor_dtype, str):
            factor_dtype = _FACTOR_DTYPES.get(factor_dtype.replace("torch.", ""), factor_dtype)
        if factor_dtype not in _FACTOR_DTYPES.values():
            raise ValueError(f"padim: factor_dtype must be torch.float32, torch.bfloat16 or torch.float16; got {factor_dtype!r}")
        self.num_features = num_features
        self.seed = seed
        self.regularization = float(regularization)
        self.blur_sigma = float(blur_sigma)
        self.image_size = self._check_size(image_size, "image_size")
        self.factor_dtype: torch.dtype = factor_dtype
        # fitted state
        self.mean: Optional[torch.Tensor] = None  # (P, D) float32
        self.factor: Optional[torch.Tensor] = None  # (P, D, D) factor_dtype, lower-triangular
        self.channel_index: Optional[torch.Tensor] = None  # (D,) int64, sorted, into the C concatenated channels
        self.level_channels_: Optional[tuple[int, ...]] = None  # C_l of each level at fit
        self.feature_size_: Optional[tuple[int, int]] = None  # (H, W) of the first level at fit
        self.n_samples_: int = 0
        self._selections: dict[torch.device, list[Optional[torch.Tensor]]] = {}

    # -- contract ---------------------------------------------------------------------------------
    def fit(self, features: Union[Levels, Iterable[Any]], labels: Optional[torch.Tensor] = None, *,
            progress: bool = False) -> "PaDiM":
        """Fit one Gaussian per position to normal training features.

        Args:
            features: one batch — a ``(B, C, H, W)`` tensor, or multi-level maps as a list / tuple /
                dict of ``(B, C_l, H_l, W_l)`` tensors — or an iterable (DataLoader, generator, list of
                batches) yielding such batches; an item that is a tuple whose first element is a
                batch and whose other elements are not 4-D tensors (``(features, labels)``) uses the
                first element. A list / tuple of tensors is always *one* multi-level batch: pass a
                list of single-level batches as ``iter(batches)``. Any floating dtype; statistics
                accumulate in float64 on the device of the first batch.
            labels: optional ``(N,)`` labels of a one-batch ``features``; all must be 0 (normal):
                PaDiM fits normal images only.
            progress: show a tqdm bar over the batches (if tqdm is installed).

        Raises:
            ValueError: wrong rank, inconsistent batches, ``num_features`` larger than ``C``, fewer
                than 2 images, inf / NaN in the features (from ``GaussianStats``: the message names
                the batch and the (image, position) pairs), non-zero labels.
            NotPositiveDefiniteError: a position's covariance cannot be factorised (the message
                names the position).

        Returns ``self``. A new fit replaces the previous statistics; the channel selection of an
        earlier fit is kept when the channel layout is unchanged.
        """
        one_batch = _is_levels(features)
        if labels is not None:
            if not one_batch:
                raise ValueError("padim: labels are only accepted with a single batch of features; "
                                 "give a loader that yields normal images only")
            normal_only(labels, "padim")
        batches: Iterable[Any] = [features] if one_batch else features
        if not one_batch and not isinstance(features, Iterable):
            raise TypeError(f"padim: fit() takes a (B, C, H, W) tensor, a list / dict of such maps, or an "
                            f"iterable of batches; got {type(features).__name__}")
        if progress:
            try:
                from tqdm.auto import tqdm

                batches = tqdm(batches, desc="padim fit", unit="batch", leave=False)
            except ImportError:
                pass

        stats: Optional[GaussianStats] = None
        layout = index = None
        for b, item in enumerate(batches):
            levels = self._levels(self._batch_of(item, b), "fit")
            if stats is None:
                layout = self._layout(levels)
                index = self._channel_index(layout[0])
                # empirical covariance + ridge, as anomalib: no fourth moments (only Ledoit-Wolf needs them), which
                # spares each update a read of the P × D² float64 scatter (D = 550: 7.6 GB, ~40 % of an update)
                stats = GaussianStats(num_positions=layout[1][0] * layout[1][1], fourth_moments=False)
                selections = self._make_selections(index, layout[0], levels[0].device)
            else:
                self._check_layout(levels, layout, "fit", f" (batch {b} differs from batch 0)")
            emb = self._embed(levels, layout, selections)  # (B, D, H, W)
            x = emb.flatten(2).transpose(1, 2)  # (B, P, D) view
            P, D = x.shape[1], x.shape[2]
            # the update's (P, D, rows + 1) float64 buffer: within 256 MiB, or 1/8 of the scatter it updates (each
            # update also reads the P × D² scatter twice: at D = 550 fewer, larger chunks pay)
            rows = max(1, max(_CHUNK_BYTES, P * D * D) // (P * D * 8))
            for chunk in x.split(rows):
                stats.update(chunk)
        if stats is None:
            raise ValueError("padim: fit() got no batches")
        n = stats.count
        if n < 2:
            raise ValueError(f"padim: fitting needs at least 2 training images; got {n}")
        level_channels, (H, W) = layout
        mean = stats.mean.to(torch.float32)
        # unbiased (ddof=1), as anomalib (torch / numpy cov); straight from the accumulators, no (P, D, D)
        # covariance beside them (7.6 GB of float64 at P = 3136, D = 550), and the accumulators released as
        # they are read (the float32 factors, 3.8 GB there, take the scatter's place instead of adding to it)
        factor = self._factorise(stats, H, W)
        del stats
        # commit
        self.mean, self.factor, self.channel_index = mean, factor, index.to(mean.device)
        self.level_channels_, self.feature_size_, self.n_samples_ = level_channels, (H, W), int(n)
        self._selections = {}
        return self

    def anomaly_map(self, features: Levels, image_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Anomaly maps ``(B, H, W)`` — or ``(B, image_size[0], image_size[1])`` — float32 on the
        features' device: per-position Mahalanobis distance, bilinear upsampling to ``image_size``
        (argument, else the constructor's), Gaussian blur. Higher = more anomalous. A position with
        an inf / NaN feature gives NaN (spread by the blur)."""
        dist = self.distances(features)[:, None]  # (B, 1, H, W)
        size = self._check_size(image_size, "image_size") or self.image_size
        if size is not None and tuple(size) != tuple(dist.shape[-2:]):
            dist = F.interpolate(dist, size=size, mode="bilinear", align_corners=False)
        if self.blur_sigma > 0:
            dist = gaussian_blur(dist, self.blur_sigma)
        return dist[:, 0]

    def score(self, features: Levels, image_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Image scores ``(B,)`` float32: the maximum of :meth:`anomaly_map` (higher = more anomalous)."""
        return self.anomaly_map(features, image_size).amax(dim=(-2, -1))

    def predict(self, features: Levels, image_size: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores (B,), anomaly maps (B, H', W'))`` from one evaluation."""
        maps = self.anomaly_map(features, image_size)
        return maps.amax(dim=(-2, -1)), maps

    def distances(self, features: Levels) -> torch.Tensor:
        """Raw per-position Mahalanobis distances ``(B, H, W)`` float32 (no upsampling, no blur)."""
        if self.mean is None:
            raise RuntimeError("padim: score() called before fit(); fit the detector on normal features first")
        levels = self._levels(features, "score")
        layout = (self.level_channels_, self.feature_size_)
        self._check_layout(levels, layout, "score", " from the fit")
        dev = levels[0].device
        if dev != self.mean.device:
            raise ValueError(f"padim: features are on {dev} but the detector is on {self.mean.device}; "
                             f"call detector.to({str(dev)!r}) (the factors are not copied per call)")
        if dev not in self._selections:
            self._selections[dev] = self._make_selections(self.channel_index, self.level_channels_, dev)
        emb = self._embed(levels, layout, self._selections[dev])
        if emb.dtype == torch.float64:
            emb = emb.to(torch.float32)  # the op takes float64 factors only with float64 x
        B, _, H, W = emb.shape
        d2 = distkern.mahalanobis_pos(emb.flatten(2).transpose(1, 2), self.mean, self.factor)  # (B, P)
        return d2.clamp_min(0).sqrt().view(B, H, W)

    def to(self, device) -> "PaDiM":
        """Move the fitted tensors to ``device``; returns ``self``."""
        device = check_device(device, self.name)
        if self.mean is not None:
            self.mean, self.factor = self.mean.to(device), self.factor.to(device)
            self.channel_index = self.channel_index.to(device)
        self._selections = {}
        return self

    @property
    def device(self) -> Optional[torch.device]:
        return None if self.mean is None else self.mean.device

    # -- persistence (safetensors + JSON, no pickle) ------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "seed": self.seed, "regularization": self.regularization,
                "blur_sigma": self.blur_sigma, "image_size": list(self.image_size) if self.image_size else None,
                "factor_dtype": str(self.factor_dtype).replace("torch.", "")}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the fitted detector to one ``.safetensors`` file: tensors ``mean``, ``factor``,
        ``channel_index`` + JSON metadata (method, format version, config, fitted layout)."""
        if self.mean is None:
            raise RuntimeError("padim: nothing to save: fit() the detector first")
        tensors = {"mean": self.mean, "factor": self.factor, "channel_index": self.channel_index}
        write_model(path, self.name, tensors, config=self._config(), format_version=FORMAT_VERSION,
                    fitted={"n_samples_": self.n_samples_, "feature_size_": list(self.feature_size_),
                            "level_channels_": list(self.level_channels_)})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device="cpu") -> "PaDiM":
        """Read a detector written by :meth:`save`; refuses a file of another method or a newer format."""
        p = os.fspath(path)
        config, fitted, tensors = read_model(p, cls.name, format_version=FORMAT_VERSION, package="distkern-padim")
        missing = {"mean", "factor", "channel_index"} - set(tensors)
        if missing or not config or not fitted:
            raise ValueError(f"padim: {p!r} is incomplete (missing {sorted(missing) or 'metadata'})")
        det = cls(**config)
        mean, factor, index = tensors["mean"], tensors["factor"], tensors["channel_index"]
        H, W = fitted["feature_size_"]
        level_channels = tuple(int(c) for c in fitted["level_channels_"])
        P, D = H * W, index.numel()
        if mean.shape != (P, D) or factor.shape != (P, D, D) or factor.dtype != det.factor_dtype:
            raise ValueError(f"padim: {p!r} is inconsistent: mean {tuple(mean.shape)}, factor {tuple(factor.shape)} "
                             f"{factor.dtype}, for P={P}, D={D}, factor_dtype={det.factor_dtype}")
        det.mean, det.factor, det.channel_index = mean, factor, index.to(torch.int64)
        det.level_channels_, det.feature_size_, det.n_samples_ = level_channels, (int(H), int(W)), int(fitted["n_samples_"])
        return det.to(device)

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _check_size(size, what: str) -> Optional[tuple[int, int]]:
        if size is None:
            return None
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"padim: {what} must be (height, width) with positive entries; got {size}")
        return size

    @staticmethod
    def _batch_of(item: Any, b: int) -> Levels:
        """The features of one item of a training iterable."""
        if _is_levels(item) and not (isinstance(item, (list, tuple)) and any(v.dim() != 4 for v in item)):
            return item
        if isinstance(item, (list, tuple)) and len(item) > 0 and _is_levels(item[0]):
            return item[0]  # (features, labels, ...) from a loader
        raise TypeError(f"padim: batch {b} of the training data is a {type(item).__name__}; expected a "
                        f"(B, C, H, W) tensor, a list / dict of such maps, or a (features, labels) tuple")

    @staticmethod
    def _levels(features: Levels, where: str) -> list[torch.Tensor]:
        if isinstance(features, torch.Tensor):
            levels = [features]
        elif isinstance(features, Mapping):
            levels = list(features.values())
        elif isinstance(features, (list, tuple)):
            levels = list(features)
        else:
            raise TypeError(f"padim: {where}() takes a (B, C, H, W) tensor or a list / dict of them; "
                            f"got {type(features).__name__}")
        if not levels:
            raise ValueError(f"padim: {where}() got an empty list of feature maps")
        for i, t in enumerate(levels):
            what = "features" if len(levels) == 1 else f"feature level {i}"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"padim: {where}(): {what} is a {type(t).__name__}, not a tensor")
            if t.dim() != 4:
                raise ValueError(f"padim: {where}() takes feature maps of shape (B, C, H, W); {what} has shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"padim: {where}() takes floating feature maps; {what} is {t.dtype}")
            if t.shape[0] != levels[0].shape[0] or t.device != levels[0].device:
                raise ValueError(f"padim: {where}(): all levels must have one batch size and device; level 0 is "
                                 f"{tuple(levels[0].shape)} on {levels[0].device}, level {i} {tuple(t.shape)} on {t.device}")
        return levels

    @staticmethod
    def _layout(levels: list[torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, int]]:
        return tuple(int(t.shape[1]) for t in levels), (int(levels[0].shape[2]), int(levels[0].shape[3]))

    def _check_layout(self, levels, layout, where: str, ref: str) -> None:
        (chans, (H, W)), (chans2, (H2, W2)) = layout, self._layout(levels)
        if len(chans2) != len(chans):
            raise ValueError(f"padim: {where}() got {len(chans2)} feature level(s); expected {len(chans)}{ref}")
        if chans2 != chans:
            raise ValueError(f"padim: {where}(): channel counts {list(chans2)} differ from {list(chans)}{ref}")
        if (H2, W2) != (H, W):
            raise ValueError(f"padim: {where}(): the feature map is {H2}x{W2} (H x W) but {H}x{W}{ref}; "
                             f"resize the input images as for training")

    def _channel_index(self, level_channels: tuple[int, ...]) -> torch.Tensor:
        C = sum(level_channels)
        old = self.channel_index
        if old is not None and self.level_channels_ is not None and sum(self.level_channels_) == C:
            return old.cpu()  # chosen once, at the first fit
        d = C if self.num_features is None else self.num_features
        if d > C:
            raise ValueError(f"padim: num_features={d} but the feature maps have only {C} channels "
                             f"(levels: {list(level_channels)})")
        if d == C:
            return torch.arange(C, dtype=torch.int64)
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return torch.randperm(C, generator=g)[:d].sort().values

    @staticmethod
    def _make_selections(index: torch.Tensor, level_channels, device) -> list[Optional[torch.Tensor]]:
        """Per level: the local channel indices to keep (``None``: all of that level)."""
        out, start, index = [], 0, index.cpu()
        for c in level_channels:
            local = index[(index >= start) & (index < start + c)] - start
            out.append(None if local.numel() == c else local.to(device))
            start += c
        return out

    @staticmethod
    def _embed(levels: list[torch.Tensor], layout, selections) -> torch.Tensor:
        """anomalib's ``generate_embedding`` followed by ``index_select`` of the kept channels; the
        selection is made per level before the (nearest) resize, which gives the same tensor."""
        _, (H, W) = layout
        parts = []
        for t, sel in zip(levels, selections):
            if sel is not None:
                t = t.index_select(1, sel)
            if t.shape[-2:] != (H, W):
                t = _resize_nearest(t, H, W)
            if t.shape[1]:
                parts.append(t)
        if len(parts) == 1:
            return parts[0]
        dtype = torch.promote_types(*[p.dtype for p in parts]) if len({p.dtype for p in parts}) > 1 else parts[0].dtype
        return torch.cat([p.to(dtype) for p in parts], 1)

    def _factorise(self, stats: GaussianStats, H: int, W: int) -> torch.Tensor:
        try:
            return stats.factor("empirical", ridge=self.regularization, ddof=1, dtype=self.factor_dtype, release=True)
        except NotPositiveDefiniteError as e:
            pos = e.index[0] if e.index else 0
            lam = e.min_eigenvalue if e.min_eigenvalue is not None else float("nan")
            raise NotPositiveDefiniteError(
                f"padim: the covariance of position {pos} (row {pos // W}, column {pos % W} of the {H}x{W} "
                f"feature map) plus regularization={self.regularization} is not positive definite "
                f"(smallest eigenvalue {lam:.6g}); increase regularization or check for degenerate "
                f"(constant or duplicated) features there", index=(pos,), min_eigenvalue=e.min_eigenvalue) from None

    def __repr__(self) -> str:
        if self.mean is None:
            state = "not fitted"
        else:
            H, W = self.feature_size_
            state = (f"fitted on {self.n_samples_} images, {H}x{W} positions, D={self.mean.shape[1]} of "
                     f"{sum(self.level_channels_)} channels")
        return (f"PaDiM(num_features={self.num_features}, seed={self.seed}, regularization={self.regularization}, "
                f"blur_sigma={self.blur_sigma}, factor_dtype={self.factor_dtype}; {state})")
