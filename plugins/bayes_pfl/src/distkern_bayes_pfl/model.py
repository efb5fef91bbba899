r"""Bayes-PFL: Bayesian Prompt Flow Learning for zero-shot anomaly detection, on distkern's fused ops.

After Qiao et al., "Bayesian Prompt Flow Learning for Zero-Shot Anomaly Detection" (CVPR 2025) and its code
(xiaozhen228/Bayes-PFL, models/VPB.py ``Context_Prompting``, models/PFL.py, loss.py). Per image:

1. a frozen vision-language encoder gives patch tokens of L layers and a global image embedding;
2. **prompt flow**: a prompt bank of ``n_prompts`` learnable context vectors (``context_length`` tokens) and
   normal / abnormal state vectors (``state_length`` tokens each). A sample ``z_c`` of the image-specific
   distribution (Gaussian + planar flow amortised from the image embedding) is added to the context tokens, a
   sample ``z_n`` / ``z_a`` of the image-agnostic normal / abnormal distribution to the state tokens; the
   prompt ``[SOS] context state name [EOS]`` goes through the frozen text encoder. Training draws one sample
   per image; inference draws ``samples`` (S) Monte-Carlo samples, giving ``K = S · n_prompts``
   (normal, abnormal) pairs (paper: 3 prompts × 10 samples × 2 states = 60 text embeddings);
3. **RCA** (residual cross-modal attention, :func:`distkern.ops.align.prompt_align`) per layer: the patch tokens
   are projected by a per-layer linear to the joint width and L2-normalised; the text embeddings, through the
   1×1 Conv1d query projection, attend over them with 4 heads and scale ``width^-½``; the residual sum is
   L2-normalised;
4. **map**: :func:`distkern.ops.align.anomaly_map` — the pair-softmax abnormal probability of the
   temperature-scaled cosines (learnable temperature, initialised at 1/0.07), averaged over the K pairs and
   the L layers → ``(B, P)``; for pixels, upsampled bilinearly and Gaussian-blurred (σ = 8 at 518 px, scaled);
5. **image score**: the text score (the image-level abnormal probability of the global embedding against the
   mapped prompts, averaged over the pairs) combined with the top-k mean of the map
   (:func:`distkern.ops.align.image_scores`: ``0.5·minmax(text) + 0.5·minmax(top-k)`` over a test set).

Training (on auxiliary labelled data, then zero-shot on other categories): focal + dice on the upsampled map,
cross-entropy on the image-level pair logits, ``kl_weight`` × the three flow KL terms (paper: 0.01), and the
prompt-bank orthogonality term of the repository; Adam (β = 0.5, 0.999) with the repository's learning-rate
groups and a cosine schedule with 10 % warm-up. The encoder is frozen.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

import distkern
from distkern.io import check_device, read_model, write_model
from distkern.metrics import binary_labels
from distkern.ops.align import anomaly_map, image_scores, prompt_align, topk_mean

from .encoders import ImageFeatures, TinyEncoder, VisionLanguageEncoder, encoder_from_config
from .flows import GaussianHead, ImageAgnosticFlow, ImageSpecificFlow

__all__ = ["BayesPFL", "RCA", "focal_loss", "dice_loss", "gaussian_blur"]

_ENCODER_API = ("encode_image", "prompt_tokens", "encode_text", "config")


# ---------------------------------------------------------------------------------------------------------------
# Building blocks


class RCA(nn.Module):
    """Residual cross-modal attention (the repository's ``Zero_Parameter``) on the fused
    :func:`~distkern.ops.align.prompt_align`: per layer ``l``, ``F_s = normalize(patches · linear_projₗ)``,
    ``q = Conv1d₁ₓ₁(text)``, keys = values = ``F_s`` (so ``w_k = w_v = I``), ``heads`` heads, scale
    ``width^-½``, ``out = normalize(text + attention)``."""

    def __init__(self, vision_width: int, width: int, layers: int, heads: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"bayes-pfl: RCA width {width} must be divisible by heads = {heads}")
        self.heads, self.width, self.scale = heads, width, width ** -0.5
        self.q_proj = nn.Conv1d(width, width, kernel_size=1)
        self.linear_proj = nn.ModuleList(nn.Linear(vision_width, width, bias=False) for _ in range(layers))

    def dense(self, patches: torch.Tensor, layer: int) -> torch.Tensor:
        """``(B, P, vision_width)`` → unit ``(B, P, width)`` (the projected patch tokens)."""
        return F.normalize(self.linear_proj[layer](patches), dim=-1)

    def forward(self, text: torch.Tensor, patches: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``text (B, T, width)`` or ``(T, width)``, ``patches (B, P, vision_width)`` → (updated text
        ``(B, T, width)`` unit vectors, projected patches ``(B, P, width)``)."""
        dense = self.dense(patches, layer)
        # keys = values = the projected tokens (no k / v projections in Bayes-PFL's RCA)
        out = prompt_align(text.to(dense.dtype), dense, self.q_proj.weight[:, :, 0].t(), None, None, self.heads,
                           b_q=self.q_proj.bias, scale=self.scale)
        return out, dense


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-8) -> torch.Tensor:
    """The repository's focal loss on an abnormal-probability map: ``−(1−p_t)^γ log p_t``, averaged separately
    over the anomalous and the normal pixels and summed."""
    fg = target > 0.5
    pt = torch.where(fg, prob, 1 - prob)
    loss = -((1 - pt) ** gamma) * torch.log(pt + eps)
    fgf = fg.to(loss.dtype)
    return (loss * fgf).sum() / (fgf.sum() + eps) + (loss * (1 - fgf)).sum() / ((1 - fgf).sum() + eps)


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The repository's (foreground) dice loss ``1 − (2Σpt + ε) / (Σp + Σt + ε)`` over the batch."""
    t = (target > 0.5).to(prob.dtype)
    return 1 - (2 * (prob * t).sum() + eps) / (prob.sum() + t.sum() + eps)


def gaussian_blur(x: torch.Tensor, sigma: tuple[float, float], truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian filter of ``(B, H, W)`` maps, symmetric ('reflect' as scipy's ``gaussian_filter``)
    boundaries, radius ``⌈truncate·σ⌉``."""
    out = x[:, None]
    for axis, s in ((2, sigma[0]), (3, sigma[1])):
        if s <= 0:
            continue
        r = min(int(math.ceil(truncate * s)), out.shape[axis] - 1)
        if r < 1:
            continue
        k = torch.arange(-r, r + 1, dtype=out.dtype, device=out.device)
        k = torch.exp(-0.5 * (k / s) ** 2)
        k = k / k.sum()
        lo, hi = out.narrow(axis, 0, r).flip(axis), out.narrow(axis, out.shape[axis] - r, r).flip(axis)
        padded = torch.cat([lo, out, hi], dim=axis)
        weight = k.view(1, 1, -1, 1) if axis == 2 else k.view(1, 1, 1, -1)
        out = F.conv2d(padded, weight)
    return out[:, 0]


def _progress(total: int, desc: str, enabled: bool):
    """A progress bar with ``update(n)``, ``set_postfix_str(s)``, ``close()``: tqdm, else rich, else plain."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="step", leave=False)
        except ImportError:
            pass
        try:
            from rich.progress import Progress

            class _Rich:
                def __init__(self):
                    self.p = Progress(transient=True)
                    self.p.start()
                    self.t = self.p.add_task(desc, total=total)

                def update(self, n=1):
                    self.p.update(self.t, advance=n)

                def set_postfix_str(self, s):
                    self.p.update(self.t, description=f"{desc} {s}")

                def close(self):
                    self.p.stop()

            return _Rich()
        except ImportError:
            pass

    class _Plain:
        def __init__(self):
            self.n, self.every, self.last = 0, max(1, total // 10), ""

        def update(self, n=1):
            self.n += n
            if enabled and (self.n % self.every == 0 or self.n == total):
                print(f"{desc}: {self.n}/{total} {self.last}", flush=True)

        def set_postfix_str(self, s):
            self.last = s

        def close(self):
            pass

    return _Plain()


# ---------------------------------------------------------------------------------------------------------------
# The method


class BayesPFL(nn.Module):
    """Bayes-PFL zero-shot anomaly maps and image scores (kind ``aligner``).

    Args:
        encoder: a frozen vision-language encoder (:class:`~distkern_bayes_pfl.encoders.VisionLanguageEncoder`
            contract); default a :class:`~distkern_bayes_pfl.encoders.TinyEncoder` (random, for demos).
        n_prompts: prompts in the bank (paper 3). context_length / state_length: learnable context / state
            tokens per prompt (paper 5 / 5). n_flows: planar transforms per distribution (paper 10).
        samples: Monte-Carlo samples per distribution at inference (paper 10; one per image in training).
        heads: RCA heads (4). temperature: initial pixel and image temperatures (1/0.07; learned).
        kl_weight: weight of each flow's KL term (0.01). ortho_weight: prompt-bank orthogonality weight (1).
        score_weight: weight of the text score in the image score (0.5). topk_fraction: top-k of the map as
            a fraction of its size (2000 / 518²). blur_sigma, blur_reference: σ of the pixel-map blur at an
            image side of ``blur_reference`` px (8 at 518), scaled linearly with the image size.
        class_name: the name in the prompt ``"[SOS] X class_name [EOS]"`` when none is given (``"object"``).
        seed: seeds the parameter initialisation (in a forked RNG, torch's RNG is untouched), the inference
            Monte-Carlo draws (common random numbers: every image sees the same standard-normal draws, so maps
            do not depend on the batch) and the default training shuffles and samples.

    ``forward(patch_tokens, image_embedding)`` or ``forward(images)`` → ``(maps (B, P), scores (B,))``;
    :meth:`fit` trains the prompts / flows / RCA; :meth:`predict` gives pixel maps and image scores;
    :meth:`save` / :meth:`load` use distkern's model file (safetensors + JSON, no pickle).
    """

    name = "bayes-pfl"
    kind = "aligner"
    distkern_api = distkern.methods.API_VERSION
    format_version = 1

    def __init__(self, encoder: VisionLanguageEncoder | None = None, *, n_prompts: int = 3, context_length: int = 5,
                 state_length: int = 5, n_flows: int = 10, samples: int = 10, heads: int = 4,
                 temperature: float = 1 / 0.07, kl_weight: float = 0.01, ortho_weight: float = 1.0,
                 score_weight: float = 0.5, topk_fraction: float = 2000 / 518 ** 2, blur_sigma: float = 8.0,
                 blur_reference: int = 518, class_name: str = "object", seed: int = 0):
        super().__init__()
        if encoder is None:
            encoder = TinyEncoder()
        missing = [m for m in _ENCODER_API if not callable(getattr(encoder, m, None))]
        if not isinstance(encoder, nn.Module) or missing:
            raise TypeError(f"bayes-pfl: encoder must be an nn.Module with {', '.join(_ENCODER_API)} (see "
                            f"distkern_bayes_pfl.encoders); got {type(encoder).__name__} missing {missing}")
        for what, v in (("n_prompts", n_prompts), ("context_length", context_length), ("state_length", state_length),
                        ("samples", samples), ("heads", heads)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"bayes-pfl: {what} must be a positive int; got {v!r}")
        if not isinstance(n_flows, int) or n_flows < 0:
            raise ValueError(f"bayes-pfl: n_flows must be an int >= 0; got {n_flows!r}")
        if not temperature > 0:
            raise ValueError(f"bayes-pfl: temperature must be > 0; got {temperature!r}")
        if not 0 <= score_weight <= 1:
            raise ValueError(f"bayes-pfl: score_weight must be in [0, 1]; got {score_weight!r}")
        if not 0 < topk_fraction <= 1:
            raise ValueError(f"bayes-pfl: topk_fraction must be in (0, 1]; got {topk_fraction!r}")
        if kl_weight < 0 or ortho_weight < 0 or blur_sigma < 0 or blur_reference <= 0:
            raise ValueError("bayes-pfl: kl_weight, ortho_weight and blur_sigma must be >= 0 and blur_reference > 0")
        self._cfg = dict(n_prompts=n_prompts, context_length=context_length, state_length=state_length,
                         n_flows=n_flows, samples=samples, heads=heads, temperature=float(temperature),
                         kl_weight=float(kl_weight), ortho_weight=float(ortho_weight),
                         score_weight=float(score_weight), topk_fraction=float(topk_fraction),
                         blur_sigma=float(blur_sigma), blur_reference=int(blur_reference), class_name=str(class_name),
                         seed=int(seed))
        self.encoder = encoder.requires_grad_(False).eval()
        Dv, W, E, L = encoder.vision_width, encoder.text_width, encoder.embed_dim, encoder.num_layers
        if 1 + context_length + state_length + 1 > getattr(encoder, "max_text_length", 77):
            raise ValueError(f"bayes-pfl: prompts of {context_length} + {state_length} learnable tokens do not fit "
                             f"the text encoder's context ({encoder.max_text_length})")
        self.vision_width, self.text_width, self.embed_dim, self.num_layers = Dv, W, E, L
        self.n_prompts, self.samples, self.seed = n_prompts, samples, int(seed)
        self.kl_weight, self.ortho_weight, self.score_weight = float(kl_weight), float(ortho_weight), float(score_weight)
        self.topk_fraction, self.class_name = float(topk_fraction), str(class_name)
        self.blur_sigma, self.blur_reference = float(blur_sigma), int(blur_reference)

        with torch.random.fork_rng(devices=[]):  # the initialisation is a function of `seed`; torch's RNG is untouched
            torch.manual_seed(self.seed)
            self._build(Dv, W, E, L, hidden=max(Dv // 2, 8), n_flows=n_flows, heads=heads, temperature=temperature,
                        n_prompts=n_prompts, context_length=context_length, state_length=state_length)
        self._train_gen: torch.Generator | None = None
        self.epochs_trained_ = 0
        self.history_: list[dict] = []

    def _build(self, Dv, W, E, L, *, hidden, n_flows, heads, temperature, n_prompts, context_length, state_length):
        self.prompt_context = nn.Parameter(torch.empty(n_prompts, context_length, W))
        self.prompt_state_normal = nn.Parameter(torch.empty(n_prompts, state_length, W))
        self.prompt_state_abnormal = nn.Parameter(torch.empty(n_prompts, state_length, W))
        self.log_temperature_pixel = nn.Parameter(torch.tensor(math.log(temperature)))
        self.log_temperature_image = nn.Parameter(torch.tensor(math.log(temperature)))
        self.context_flow = ImageSpecificFlow(E, hidden, W, n_flows)
        self.state_head = GaussianHead(E, hidden, W)  # shared by the normal and abnormal image-agnostic flows
        self.normal_flow = ImageAgnosticFlow(E, W, n_flows)
        self.abnormal_flow = ImageAgnosticFlow(E, W, n_flows)
        self.rca = RCA(Dv, E, L, heads)
        self.class_mapping = nn.Linear(E, E)
        enc = set(map(id, self.encoder.modules()))
        for m in self.modules():  # the repository's _initialize_weights (the encoder is left alone)
            if isinstance(m, nn.Linear) and id(m) not in enc:
                m.weight.data.normal_(0.0, 0.02)
                if m.bias is not None:
                    m.bias.data.zero_()
        nn.init.trunc_normal_(self.prompt_context, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.prompt_state_normal, mean=0.5, std=0.02, a=0.46, b=0.54)
        nn.init.trunc_normal_(self.prompt_state_abnormal, mean=-0.5, std=0.02, a=-0.54, b=-0.46)

    # -- config ---------------------------------------------------------------------------------------------------

    def config(self) -> dict:
        """The constructor arguments (JSON-able), the encoder's description under ``"encoder"``."""
        return {**self._cfg, "encoder": self.encoder.config()}

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters :meth:`fit` trains: everything but the encoder."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("encoder.")]

    # -- checks ---------------------------------------------------------------------------------------------------

    def _dtype(self) -> torch.dtype:
        return self.prompt_context.dtype

    def _as_tokens(self, tokens, image_embedding) -> tuple[torch.Tensor, torch.Tensor]:
        L, Dv, E = self.num_layers, self.vision_width, self.embed_dim
        if isinstance(tokens, (list, tuple)):
            if not all(isinstance(t, torch.Tensor) for t in tokens):
                raise TypeError("bayes-pfl: a list of patch tokens must hold tensors (B, P, D)")
            if len({tuple(t.shape) for t in tokens}) > 1:
                raise ValueError(f"bayes-pfl: the layers' patch tokens must share one shape (B, P, D); got "
                                 f"{[tuple(t.shape) for t in tokens]}")
            tokens = torch.stack(list(tokens)) if tokens else torch.empty(0)
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"bayes-pfl: patch tokens must be a tensor (L, B, P, D) or a list of (B, P, D); got "
                            f"{type(tokens).__name__}")
        if not isinstance(image_embedding, torch.Tensor):
            raise TypeError(f"bayes-pfl: image_embedding must be a tensor (B, E); got {type(image_embedding).__name__}")
        if tokens.dim() == 3 and L == 1:
            tokens = tokens[None]
        if tokens.dim() != 4 or tokens.shape[0] != L or tokens.shape[-1] != Dv or tokens.shape[2] < 1:
            one = " or (B, P, D) for this one-layer model" if L == 1 else ""
            raise ValueError(f"bayes-pfl: patch tokens must be (L, B, P, D) = ({L}, B, P, {Dv}){one}; got "
                             f"{tuple(tokens.shape)}")
        B = tokens.shape[1]
        if image_embedding.dim() != 2 or image_embedding.shape != (B, E):
            raise ValueError(f"bayes-pfl: image_embedding must be (B, E) = ({B}, {E}) for patch tokens of batch {B}; "
                             f"got {tuple(image_embedding.shape)}")
        if not tokens.is_floating_point() or not image_embedding.is_floating_point():
            raise TypeError("bayes-pfl: patch tokens and image_embedding must be floating point")
        dt = self._dtype()
        return tokens.to(dt), image_embedding.to(dt)

    def _names(self, names, B: int) -> list[str]:
        if names is None:
            return [self.class_name] * B
        if isinstance(names, str):
            return [names] * B
        names = list(names)
        if len(names) != B or not all(isinstance(n, str) for n in names):
            raise ValueError(f"bayes-pfl: names must be a str or a list of {B} str (one per image); got {names!r}")
        return names

    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """The frozen encoder's features of ``images (B, 3, H, W)`` (no gradient)."""
        with torch.no_grad():
            f = self.encoder.encode_image(images)
        return ImageFeatures(f.patches.to(self._dtype()), f.global_embedding.to(self._dtype()), f.grid)

    # -- the model ------------------------------------------------------------------------------------------------

    def _eps(self, S: int, B: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        W, dt = self.text_width, self._dtype()
        if self.training:
            g = self._train_gen
            shape_c = (S, B, W)
        else:  # common random numbers: the same draws for every image, every call
            g = torch.Generator().manual_seed(self.seed)
            shape_c = (S, 1, W)
        draws = [torch.randn(s, generator=g, dtype=dt) if g is not None else torch.randn(s, dtype=dt)
                 for s in (shape_c, (S, 1, W), (S, 1, W))]
        return tuple(d.to(device) for d in draws)

    def prompts(self, image_embedding: torch.Tensor, names=None, samples: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings of the sampled prompts: ``(B, K, 2, E)`` unit vectors (K = samples · n_prompts pairs;
        index 0 normal, 1 abnormal) and the flows' weighted KL regulariser (a scalar)."""
        B = image_embedding.shape[0]
        S = samples if samples is not None else (1 if self.training else self.samples)
        Pn = self.n_prompts
        eps_c, eps_n, eps_a = self._eps(S, B, image_embedding.device)
        zc, kl_c = self.context_flow(image_embedding, eps_c)  # (S, B, W)
        zn, kl_n = self.normal_flow(self.state_head, eps_n)  # (S, 1, W)
        za, kl_a = self.abnormal_flow(self.state_head, eps_a)
        ctx = self.prompt_context + zc[:, :, None, None, :]  # (S, B, Pn, Pc, W)
        st = torch.stack([self.prompt_state_normal + zn[:, :, None, None, :],
                          self.prompt_state_abnormal + za[:, :, None, None, :]], dim=3)  # (S, 1, Pn, 2, Q, W)
        learned = torch.cat([ctx[:, :, :, None].expand(S, B, Pn, 2, *ctx.shape[-2:]),
                             st.expand(S, B, Pn, 2, *st.shape[-2:])], dim=-2)  # (S, B, Pn, 2, n, W)
        names = self._names(names, B)
        out = image_embedding.new_empty(S, B, Pn, 2, self.embed_dim)
        for name in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == name]
            pre, suf = self.encoder.prompt_tokens(name)
            part = learned if len(idx) == B else learned[:, idx]
            lead = part.shape[:-2]
            seq = torch.cat([pre.to(part.dtype).expand(*lead, *pre.shape), part,
                             suf.to(part.dtype).expand(*lead, *suf.shape)], dim=-2)
            emb = self.encoder.encode_text(seq.reshape(-1, *seq.shape[-2:]))
            if len(idx) == B:
                out = emb.reshape(*lead, -1).to(out.dtype)
            else:
                out[:, idx] = emb.reshape(*lead, -1).to(out.dtype)
        text = F.normalize(out.permute(1, 0, 2, 3, 4).reshape(B, S * Pn, 2, self.embed_dim), dim=-1)
        return text, self.kl_weight * (kl_c + kl_n + kl_a)

    def _core(self, patches: torch.Tensor, glob: torch.Tensor, names=None) -> dict:
        text, reg = self.prompts(glob, names)
        B, K, _, E = text.shape
        flat = text.reshape(B, 2 * K, E)
        upd, dense = [], []
        for layer in range(self.num_layers):
            o, d = self.rca(flat, patches[layer], layer)
            upd.append(o.reshape(B, K, 2, E))
            dense.append(d)
        amap = anomaly_map(torch.stack(dense), torch.stack(upd), self.log_temperature_pixel.exp())
        t = F.normalize(self.class_mapping(text), dim=-1)
        logits = self.log_temperature_image.exp() * torch.einsum("bkse,be->bks", t, F.normalize(glob, dim=-1))
        text_score = logits.softmax(-1)[..., 1].mean(-1)
        return {"map": amap, "text_score": text_score, "logits": logits, "text": text, "reg": reg}

    def _features(self, inputs, image_embedding):
        if image_embedding is None:
            if not isinstance(inputs, torch.Tensor):
                raise TypeError("bayes-pfl: give images (B, 3, H, W), or patch tokens with image_embedding=")
            if inputs.dim() != 4 or inputs.shape[1] != 3:
                raise ValueError(f"bayes-pfl: without image_embedding the input must be images (B, 3, H, W); got "
                                 f"{tuple(inputs.shape)} (for patch tokens (L, B, P, D) pass image_embedding=)")
            f = self.encode(inputs)
            return f.patches, f.global_embedding, f.grid
        tokens, glob = self._as_tokens(inputs, image_embedding)
        return tokens, glob, None

    def forward(self, inputs, image_embedding: torch.Tensor | None = None, *, names=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps and image scores.

        ``inputs``: patch tokens ``(L, B, P, vision_width)`` (a list of L ``(B, P, D)``, or ``(B, P, D)`` for a
        one-layer model) together with ``image_embedding (B, embed_dim)``; or images ``(B, 3, H, W)`` (encoded
        by the frozen encoder) with ``image_embedding=None``. ``names``: the class name(s) in the prompts.

        Returns ``maps (B, P)`` (abnormal probability per patch, float32) and ``scores (B,)`` =
        ``score_weight · text score + (1 − score_weight) · top-k mean of the map`` (per image, not min-max
        normalised; :meth:`predict` gives the paper's min-max combination over a set). Training mode draws one
        prompt sample per image from torch's generator; eval mode ``samples`` seeded common draws.
        Differentiable in the patch tokens, the image embedding and the parameters.
        """
        patches, glob, _ = self._features(inputs, image_embedding)
        out = self._core(patches, glob, names)
        k = max(1, round(self.topk_fraction * out["map"].shape[1]))
        scores = self.score_weight * out["text_score"] + (1 - self.score_weight) * topk_mean(out["map"], k)
        return out["map"], scores

    def pixel_maps(self, maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                   blur: bool = True) -> torch.Tensor:
        """Patch maps ``(B, P)`` on a ``grid (h, w)`` → ``(B, H, W)``: bilinear upsampling (align_corners, as
        the repository), then a Gaussian blur of σ = ``blur_sigma · side / blur_reference`` per axis."""
        h, w = grid
        if maps.dim() != 2 or maps.shape[1] != h * w:
            raise ValueError(f"bayes-pfl: maps must be (B, h·w) = (B, {h * w}); got {tuple(maps.shape)}")
        pix = F.interpolate(maps.reshape(-1, 1, h, w), size=tuple(size), mode="bilinear", align_corners=True)[:, 0]
        if blur and self.blur_sigma > 0:
            s = (self.blur_sigma * size[0] / self.blur_reference, self.blur_sigma * size[1] / self.blur_reference)
            pix = gaussian_blur(pix, s)
        return pix

    @torch.no_grad()
    def predict(self, images: torch.Tensor, *, names=None, batch_size: int = 32, return_parts: bool = False,
                progress: bool = False):
        """``images (N, 3, H, W)`` → ``(pixel maps (N, H, W), image scores (N,))``, in eval mode.

        The image scores are Bayes-PFL's ``score_weight·minmax(text score) + (1 − score_weight)·minmax(top-k
        mean of the pixel map)`` with k = ``topk_fraction · H · W`` and min-max over the N images — so score a
        whole test set (of one category) in one call. ``return_parts=True`` adds a dict with the raw
        ``text_score (N,)`` and ``topk (N,)``."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"bayes-pfl: predict takes images (N, 3, H, W); got {type(images).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"bayes-pfl: batch_size must be an int >= 1; got {batch_size!r}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
            raise ValueError(f"bayes-pfl: predict takes images (N, 3, H, W); got {tuple(images.shape)}")
        N = images.shape[0]
        names = self._names(names, N)
        was = self.training
        self.eval()
        try:
            pix, ts = [], []
            bar = _progress((N + batch_size - 1) // batch_size, "bayes-pfl predict", progress)
            for i in range(0, N, batch_size):
                f = self.encode(images[i:i + batch_size].to(self.prompt_context.device))
                out = self._core(f.patches, f.global_embedding, names[i:i + batch_size])
                pix.append(self.pixel_maps(out["map"], f.grid, images.shape[-2:]))
                ts.append(out["text_score"])
                bar.update(1)
            bar.close()
        finally:
            self.train(was)
        pix, ts = torch.cat(pix), torch.cat(ts)
        k = max(1, round(self.topk_fraction * pix.shape[1] * pix.shape[2]))
        scores = image_scores(pix, ts, k=k, weight=self.score_weight)
        if return_parts:
            return pix, scores, {"text_score": ts, "topk": topk_mean(pix, k)}
        return pix, scores

    # -- training -------------------------------------------------------------------------------------------------

    def loss(self, patches: torch.Tensor, glob: torch.Tensor, grid: tuple[int, int], masks: torch.Tensor,
             labels: torch.Tensor, names=None) -> tuple[torch.Tensor, dict]:
        """The training loss on one batch of features: focal + dice on the upsampled map, cross-entropy on the
        image-level pair logits, the flows' KL and the prompt-bank orthogonality term. Returns (loss, parts)."""
        out = self._core(patches, glob, names)
        B = glob.shape[0]
        pix = self.pixel_maps(out["map"], grid, masks.shape[-2:], blur=False)
        seg = focal_loss(pix, masks) + dice_loss(pix, masks)
        logits = out["logits"]
        K = logits.shape[1]
        cls = F.cross_entropy(logits.reshape(-1, 2), labels.long().repeat_interleave(K))
        ortho = pix.new_zeros(())
        if self.ortho_weight and K > 1:
            off = 1 - torch.eye(K, device=pix.device, dtype=pix.dtype)
            for s in range(2):
                e = out["text"][:, :, s]
                ortho = ortho + ((e @ e.transpose(1, 2)) ** 2 * off).sum() / (B * K * K)
        total = seg + cls + out["reg"] + self.ortho_weight * ortho
        return total, {"seg": float(seg.detach()), "cls": float(cls.detach()), "kl": float(out["reg"].detach()),
                       "ortho": float(ortho.detach())}

    def _param_groups(self, lr_prompt, lr_flow, lr_linear, lr_temperature):
        groups = {"prompt": [], "flow": [], "temperature": [], "linear": []}
        for n, p in self.trainable_parameters():
            if not p.requires_grad:
                continue
            if n.startswith("prompt_"):
                groups["prompt"].append(p)
            elif n.startswith("log_temperature"):
                groups["temperature"].append(p)
            elif n.startswith(("normal_flow.", "abnormal_flow.", "context_flow.amor_")):
                groups["flow"].append(p)
            else:
                groups["linear"].append(p)
        lrs = {"prompt": lr_prompt, "flow": lr_flow, "temperature": lr_temperature, "linear": lr_linear}
        return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]

    @staticmethod
    def _batch_parts(batch):
        if isinstance(batch, dict):
            try:
                imgs, masks = batch["img"], batch["img_mask"]
            except KeyError:
                raise ValueError("bayes-pfl: a dict batch needs 'img' (B, 3, H, W) and 'img_mask' (B, H, W); got keys "
                                 f"{sorted(batch)}") from None
            return imgs, masks, batch.get("anomaly"), batch.get("cls_name")
        if isinstance(batch, (list, tuple)) and len(batch) in (2, 3, 4):
            return (*batch, *([None] * (4 - len(batch))))
        raise ValueError("bayes-pfl: a loader must yield (images, masks[, labels[, names]]) or dicts with 'img', "
                         f"'img_mask'[, 'anomaly', 'cls_name']; got {type(batch).__name__}")

    def _check_masks(self, images, masks, labels):
        if not isinstance(masks, torch.Tensor):
            raise TypeError(f"bayes-pfl: masks must be a tensor (N, H, W); got {type(masks).__name__}")
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.dim() != 3 or masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"bayes-pfl: masks must be (N, H, W) = ({images.shape[0]}, {images.shape[2]}, "
                             f"{images.shape[3]}) matching the images; got {tuple(masks.shape)}")
        masks = (masks > 0.5).to(self._dtype())
        if labels is None:
            labels = masks.flatten(1).amax(1).long()
        else:
            labels = torch.as_tensor(labels).reshape(-1)
            if labels.shape[0] != images.shape[0]:
                raise ValueError(f"bayes-pfl: labels must be (N,) = ({images.shape[0]},); got {tuple(labels.shape)}")
            labels = binary_labels(labels, "bayes-pfl").long().to(masks.device)
        return masks, labels

    def fit(self, data, masks: torch.Tensor | None = None, labels: torch.Tensor | None = None, *, epochs: int = 10,
            batch_size: int = 16, lr_prompt: float = 1e-3, lr_flow: float = 1e-3, lr_linear: float = 1e-4,
            lr_temperature: float = 1e-2, warmup: float = 0.1, names=None, seed: int | None = None,
            progress: bool = True, cache_features: bool = True) -> BayesPFL:
        """Train the prompts, flows, RCA and projections on auxiliary labelled data (the encoder is frozen).

        ``data``: images ``(N, 3, H, W)`` with ``masks (N, H, W)`` (anomalous pixels > 0.5) and optional
        ``labels (N,)`` (default: whether the mask has any anomalous pixel) and ``names`` (str or N str); or
        an iterable / DataLoader of batches ``(images, masks[, labels[, names]])`` or dicts ``{'img',
        'img_mask'[, 'anomaly', 'cls_name']}`` (the repository's format). With tensors, the frozen encoder's
        features are computed once (``cache_features``). Adam (β = 0.5, 0.999), learning rates per group as
        the repository (prompt, flow, temperature, linear), cosine schedule with ``warmup`` fraction of
        linear warm-up. ``seed`` (default ``self.seed``) fixes the shuffles and the prompt samples.
        Returns self; per-epoch mean losses are appended to ``history_``.
        """
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"bayes-pfl: epochs must be an int >= 0; got {epochs!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"bayes-pfl: batch_size must be a positive int; got {batch_size!r}")
        seed = self.seed if seed is None else int(seed)
        gen = torch.Generator().manual_seed(seed)
        device = self.prompt_context.device
        if isinstance(data, torch.Tensor):
            if data.dim() != 4 or data.shape[1] != 3:
                raise ValueError(f"bayes-pfl: fit takes images (N, 3, H, W); got {tuple(data.shape)}")
            if masks is None:
                raise ValueError("bayes-pfl: fit on image tensors needs masks (N, H, W)")
            masks, labels = self._check_masks(data, masks, labels)
            N = data.shape[0]
            all_names = self._names(names, N)
            feats = None
            if cache_features:
                parts = [self.encode(data[i:i + 64].to(device)) for i in range(0, N, 64)]
                feats = (torch.cat([p.patches for p in parts], 1), torch.cat([p.global_embedding for p in parts]),
                         parts[0].grid)

            def batches():
                order = torch.randperm(N, generator=gen)
                for i in range(0, N, batch_size):
                    idx = order[i:i + batch_size]
                    nm = [all_names[j] for j in idx.tolist()]
                    if feats is not None:
                        yield (feats[0][:, idx.to(feats[0].device)], feats[1][idx.to(feats[1].device)], feats[2],
                               masks[idx].to(device), labels[idx].to(device), nm)
                    else:
                        f = self.encode(data[idx].to(device))
                        yield f.patches, f.global_embedding, f.grid, masks[idx].to(device), labels[idx].to(device), nm

            steps = (N + batch_size - 1) // batch_size
        elif isinstance(data, Iterable):
            loader = data

            def batches():
                for batch in loader:
                    imgs, m, y, nm = self._batch_parts(batch)
                    imgs = torch.as_tensor(imgs)
                    m, y = self._check_masks(imgs, torch.as_tensor(m), y)
                    f = self.encode(imgs.to(device))
                    yield f.patches, f.global_embedding, f.grid, m.to(device), y.to(device), nm

            try:
                steps = len(data)
            except TypeError:
                steps = 0
        else:
            raise TypeError(f"bayes-pfl: fit takes images (N, 3, H, W) with masks, or an iterable of batches; got "
                            f"{type(data).__name__}")

        opt = torch.optim.Adam(self._param_groups(lr_prompt, lr_flow, lr_linear, lr_temperature), betas=(0.5, 0.999))
        total_steps = steps * epochs
        n_warm = int(warmup * total_steps)

        def lr_lambda(step):
            if total_steps <= 0:
                return 1.0
            if step < n_warm:
                return (step + 1) / n_warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - n_warm) / max(1, total_steps - n_warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        bar = _progress(total_steps or epochs, "bayes-pfl fit", progress)
        self.train()
        self._train_gen = torch.Generator().manual_seed(seed + 1)
        try:
            for _ in range(epochs):
                t0, sums, n = time.perf_counter(), {}, 0
                for patches, glob, grid, m, y, nm in batches():
                    loss, parts = self.loss(patches, glob, grid, m, y, nm)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    parts["loss"] = float(loss.detach())
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n += 1
                    bar.set_postfix_str(f"loss {parts['loss']:.3f}")
                    if total_steps:
                        bar.update(1)
                if not total_steps:
                    bar.update(1)
                if n == 0:  # e.g. a generator, spent by the first epoch: say so rather than count empty epochs
                    raise ValueError(f"bayes-pfl: epoch {self.epochs_trained_ + 1} got no batches; give a re-iterable "
                                     "loader (a DataLoader or a list, not a generator) for epochs > 1")
                self.epochs_trained_ += 1
                self.history_.append({**{k: v / max(n, 1) for k, v in sums.items()},
                                      "seconds": time.perf_counter() - t0})
        finally:
            self._train_gen = None
            bar.close()
            self.eval()
        return self

    # -- save / load ----------------------------------------------------------------------------------------------

    def save(self, path) -> None:
        """One ``.safetensors`` file: the trained parameters (and the encoder's weights when it is small — the
        TinyEncoder), the config and the encoder's description as JSON metadata. No pickle."""
        keep_encoder = bool(getattr(self.encoder, "saves_weights", lambda: False)())
        tensors = {k: v for k, v in self.state_dict().items() if keep_encoder or not k.startswith("encoder.")}
        write_model(path, self.name, tensors, config=self.config(),
                    fitted={"epochs_trained": self.epochs_trained_, "history": self.history_},
                    format_version=self.format_version)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu", encoder: VisionLanguageEncoder | None = None) -> BayesPFL:
        """Read a model saved by :meth:`save`. ``encoder``: the encoder to use (needed when the file's encoder is
        not rebuildable, e.g. to point an OpenCLIP model at its weights); default rebuilt from the file."""
        device = check_device(device, cls.name)  # before any work: "cuda" on a CPU-only torch, say
        config, fitted, tensors = read_model(path, cls.name, format_version=cls.format_version,
                                             package="distkern-bayes-pfl")
        enc_cfg = config.pop("encoder", None)
        if encoder is None:
            if enc_cfg is None:
                raise ValueError(f"bayes-pfl: {path!r} does not describe its encoder; pass encoder=")
            encoder = encoder_from_config(enc_cfg)
        model = cls(encoder, **config)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise ValueError(f"bayes-pfl: {path!r} does not match the model (missing {missing}, unexpected "
                             f"{unexpected})")
        model.epochs_trained_ = int(fitted.get("epochs_trained", 0))
        model.history_ = list(fitted.get("history", []))
        return model.to(device).eval()

    # -- distkern.testing hooks -----------------------------------------------------------------------------------

    @classmethod
    def example_instance(cls) -> BayesPFL:
        """A small one-layer instance for ``distkern.testing.check_method``."""
        enc = TinyEncoder(vision_width=32, text_width=32, embed_dim=32, depth=2, layers=(2,), vocab_size=64,
                          context_length=16, seed=0)
        return cls(enc, n_prompts=2, context_length=2, state_length=2, n_flows=2, samples=2)

    @staticmethod
    def example_data(generator: torch.Generator):
        """``(patch tokens (2, 16, 32), image embedding (2, 32))`` for :meth:`example_instance`."""
        return torch.randn(2, 16, 32, generator=generator), torch.randn(2, 32, generator=generator)
