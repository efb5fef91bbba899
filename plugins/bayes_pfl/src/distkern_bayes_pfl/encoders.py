"""Vision-language encoders for Bayes-PFL: the interface, a tiny random one, and an OpenCLIP adapter.

Bayes-PFL needs four things from a frozen CLIP-like model:

* ``encode_image(images (B, 3, H, W))`` → :class:`ImageFeatures`: patch tokens of L intermediate layers
  ``(L, B, P, vision_width)`` (class token dropped), the global image embedding ``(B, embed_dim)``, and the
  patch grid ``(h, w)`` with ``h·w = P``;
* ``prompt_tokens(name)`` → the frozen token embeddings around the learnable part of the prompt
  ``"[SOS] X name [EOS]"``: ``prefix (n0, text_width)`` (the [SOS]) and ``suffix (n1, text_width)``
  (the class name and [EOS]); the learnable context / state vectors replace ``X``;
* ``encode_text(x (N, n, text_width))`` → ``(N, embed_dim)``: the text transformer on token embeddings,
  pooled at the last position (the [EOS]) and projected;
* the widths ``vision_width``, ``text_width``, ``embed_dim`` and the number of layers ``num_layers``.

:class:`TinyEncoder` is a small randomly initialised (seeded) conv/ViT-ish image encoder with a one-block
text transformer, for tests and CPU demos. :class:`OpenCLIPEncoder` wraps an ``open_clip`` model whose
weights the user has on disk; it is used only when ``open_clip`` is installed (nothing is downloaded).
"""
from __future__ import annotations

import math
import os
import re
import zlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageFeatures", "VisionLanguageEncoder", "TinyEncoder", "OpenCLIPEncoder", "encoder_from_config"]


class ImageFeatures(NamedTuple):
    """What an encoder gives for an image batch."""

    patches: torch.Tensor  # (L, B, P, vision_width)
    global_embedding: torch.Tensor  # (B, embed_dim)
    grid: tuple[int, int]  # (h, w), h * w = P


class VisionLanguageEncoder(nn.Module):
    """Base class of the encoders Bayes-PFL plugs into (see the module docstring for the contract)."""

    vision_width: int
    text_width: int
    embed_dim: int
    num_layers: int
    max_text_length: int = 77

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:  # pragma: no cover - abstract
        raise NotImplementedError

    def prompt_tokens(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-able description that :func:`encoder_from_config` rebuilds the encoder from."""
        raise NotImplementedError

    def saves_weights(self) -> bool:
        """Whether :meth:`BayesPFL.save` stores this encoder's weights in the model file (small encoders)."""
        return False

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"bayes-pfl: images must be a tensor (B, 3, H, W); got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"bayes-pfl: images must be (B, 3, H, W); got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"bayes-pfl: images must be floating point (values in [0, 1]); got {images.dtype}")


# ---------------------------------------------------------------------------------------------------------------
# A tiny random encoder


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(o.transpose(1, 2).reshape(B, N, D))


class _Block(nn.Module):
    """Pre-LN block: token mixing (global attention, or a depthwise 3×3 conv on the patch grid) + MLP."""

    def __init__(self, width: int, heads: int, mixer: str):
        super().__init__()
        self.mixer = mixer
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        if mixer == "attention":
            self.mix = _Attention(width, heads)
        else:
            self.mix = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None, causal: bool = False) -> torch.Tensor:
        h = self.ln1(x)
        if self.mixer == "attention":
            x = x + self.mix(h, causal=causal)
        else:
            B, P, D = h.shape
            g = h.transpose(1, 2).reshape(B, D, *grid)
            x = x + self.mix(g).reshape(B, D, P).transpose(1, 2)
        return x + self.mlp(self.ln2(x))


class TinyEncoder(VisionLanguageEncoder):
    """A small randomly initialised CLIP-like encoder (for tests and CPU demos; it has learned nothing).

    Image side: a two-conv stem (stride ``patch_size``) to a ``(H/patch, W/patch)`` token grid, then ``depth``
    pre-LN blocks alternating a depthwise 3×3 conv and global self-attention (conv/ViT-ish); the patch tokens
    after the blocks in ``layers`` (1-based) are returned, and the global embedding is the LayerNormed mean
    token of the last block projected to ``embed_dim``. Text side: a hashed word vocabulary, learned-free
    token and position embeddings, ``text_depth`` causal attention blocks, a final LayerNorm and a projection
    of the last ([EOS]) token. All weights come from ``torch.manual_seed(seed)`` (the global RNG is left as it
    was) and are frozen.
    """

    def __init__(self, *, patch_size: int = 4, vision_width: int = 64, depth: int = 4,
                 layers: tuple[int, ...] | list[int] = (2, 3, 4), heads: int = 4, text_width: int = 64,
                 text_depth: int = 1, embed_dim: int = 64, vocab_size: int = 1024, context_length: int = 32,
                 seed: int = 0):
        super().__init__()
        layers = tuple(int(i) for i in layers)
        if not layers or any(i < 1 or i > depth for i in layers):
            raise ValueError(f"bayes-pfl: TinyEncoder layers must be in 1..depth = {depth}; got {layers}")
        if patch_size < 2 or patch_size % 2:
            raise ValueError(f"bayes-pfl: TinyEncoder patch_size must be an even number >= 2; got {patch_size}")
        for w, what in ((vision_width, "vision_width"), (text_width, "text_width")):
            if w % heads:
                raise ValueError(f"bayes-pfl: TinyEncoder {what} = {w} must be divisible by heads = {heads}")
        self._cfg = dict(patch_size=patch_size, vision_width=vision_width, depth=depth, layers=list(layers),
                         heads=heads, text_width=text_width, text_depth=text_depth, embed_dim=embed_dim,
                         vocab_size=vocab_size, context_length=context_length, seed=seed)
        self.vision_width, self.text_width, self.embed_dim = vision_width, text_width, embed_dim
        self.layers, self.num_layers, self.patch_size = layers, len(layers), patch_size
        self.vocab_size, self.max_text_length = vocab_size, context_length
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            half = max(vision_width // 2, 8)
            self.stem = nn.Sequential(
                nn.Conv2d(3, half, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(half, vision_width, patch_size // 2, stride=patch_size // 2))
            self.blocks = nn.ModuleList(_Block(vision_width, heads, "conv" if i % 2 == 0 else "attention")
                                        for i in range(depth))
            self.ln_post = nn.LayerNorm(vision_width)
            self.proj = nn.Parameter(torch.randn(vision_width, embed_dim) * vision_width ** -0.5)
            self.token_embedding = nn.Parameter(torch.randn(vocab_size, text_width) * 0.02)
            self.positional_embedding = nn.Parameter(torch.randn(context_length, text_width) * 0.01)
            self.text_blocks = nn.ModuleList(_Block(text_width, heads, "attention") for _ in range(text_depth))
            self.ln_final = nn.LayerNorm(text_width)
            self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width ** -0.5)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def config(self) -> dict:
        return {"type": "tiny", **self._cfg}

    def saves_weights(self) -> bool:
        return True

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        self._check_images(images)
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"bayes-pfl: TinyEncoder needs image sides divisible by patch_size = {self.patch_size}; "
                             f"got {H}x{W}")
        x = self.stem((images.to(self.proj.dtype) - self.mean) / self.std)  # (B, D, h, w)
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        out = []
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x, grid=(h, w))
            if i in self.layers:
                out.append(x)
        glob = self.ln_post(x.mean(1)) @ self.proj
        return ImageFeatures(torch.stack(out), glob, (h, w))

    def tokenize(self, text: str) -> list[int]:
        """Word ids in ``[2, vocab_size)`` by a stable hash (0 is [SOS], 1 is [EOS])."""
        words = [w for w in re.split(r"[^0-9a-z]+", text.lower()) if w]
        return [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in words]

    def prompt_tokens(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenize(name) + [1]
        return self.token_embedding[:1], self.token_embedding[torch.tensor(ids, device=self.token_embedding.device)]

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n > self.max_text_length:
            raise ValueError(f"bayes-pfl: prompt of {n} tokens is longer than the encoder's context "
                             f"({self.max_text_length})")
        x = x + self.positional_embedding[:n]
        for blk in self.text_blocks:
            x = blk(x, causal=True)
        return self.ln_final(x[:, -1]) @ self.text_projection


# ---------------------------------------------------------------------------------------------------------------
# OpenCLIP adapter (optional; weights must already be on disk)


class OpenCLIPEncoder(VisionLanguageEncoder):
    """Adapter for an ``open_clip`` ViT CLIP model loaded from a local weights file.

    ``model_name``: an open_clip architecture name (e.g. ``"ViT-L-14-336"``); ``weights``: the path of its
    checkpoint on disk (nothing is downloaded); ``layers``: the 1-based transformer blocks whose patch tokens
    are used (Bayes-PFL: 6, 12, 18, 24 for ViT-L/14). Requires ``pip install open_clip_torch``. Untested in
    this repository (no weights are available offline); written against open_clip ≥ 2.20.
    """

    def __init__(self, model_name: str, weights: str, *, layers: tuple[int, ...] | list[int] = (6, 12, 18, 24),
                 image_size: int | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        try:
            import open_clip  # noqa: F401 - optional dependency
        except ImportError as e:
            raise ImportError("bayes-pfl: OpenCLIPEncoder needs open_clip (pip install open_clip_torch)") from e
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"bayes-pfl: no CLIP weights at {weights!r} (give the path of a local "
                                    "checkpoint; nothing is downloaded)")
        kwargs = {"force_image_size": image_size} if image_size else {}
        model = open_clip.create_model(model_name, pretrained=weights, device=device, **kwargs)
        self.model = model.eval().requires_grad_(False)
        self._tokenizer = open_clip.get_tokenizer(model_name)
        self._cfg = {"type": "open_clip", "model_name": model_name, "weights": os.path.abspath(weights),
                     "layers": [int(i) for i in layers], "image_size": image_size}
        visual = model.visual
        self.layers = tuple(int(i) for i in layers)
        self.num_layers = len(self.layers)
        self.vision_width = visual.transformer.width
        self.text_width = model.token_embedding.weight.shape[1]
        self.embed_dim = model.text_projection.shape[1] if model.text_projection is not None else self.text_width
        self.max_text_length = model.positional_embedding.shape[0]
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def config(self) -> dict:
        return dict(self._cfg)

    def train(self, mode: bool = True):
        return super().train(False)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        self._check_images(images)
        visual = self.model.visual
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", False)
        captured: dict[int, torch.Tensor] = {}
        hooks = [blocks[i - 1].register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, out))
                 for i in self.layers]
        try:
            glob = self.model.encode_image((images - self.mean) / self.std)
        finally:
            for h in hooks:
                h.remove()
        toks = []
        for i in self.layers:
            t = captured[i]
            t = t if batch_first else t.transpose(0, 1)  # (B, 1 + P, D)
            toks.append(t[:, 1:])
        P = toks[0].shape[1]
        gh, gw = getattr(visual, "grid_size", (int(math.isqrt(P)), int(math.isqrt(P))))
        return ImageFeatures(torch.stack(toks), glob, (int(gh), int(gw)))

    def prompt_tokens(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._tokenizer([name])[0].tolist()
        eot = ids.index(max(ids))  # [EOT] has the largest id of the vocabulary
        emb = self.model.token_embedding.weight
        tok = torch.tensor(ids[1:eot + 1], device=emb.device)
        return emb[ids[0]:ids[0] + 1], emb[tok]

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        N, n, W = x.shape
        if n > self.max_text_length:
            raise ValueError(f"bayes-pfl: prompt of {n} tokens is longer than CLIP's context ({self.max_text_length})")
        x = torch.cat([x, x.new_zeros(N, self.max_text_length - n, W)], 1) + m.positional_embedding
        batch_first = getattr(m.transformer, "batch_first", False)
        x = m.transformer(x if batch_first else x.transpose(0, 1), attn_mask=m.attn_mask)
        x = x if batch_first else x.transpose(0, 1)
        x = m.ln_final(x[:, n - 1])
        return x @ m.text_projection if m.text_projection is not None else x


def encoder_from_config(cfg: dict) -> VisionLanguageEncoder:
    """Rebuild an encoder from :meth:`VisionLanguageEncoder.config`."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind == "tiny":
        return TinyEncoder(**cfg)
    if kind == "open_clip":
        return OpenCLIPEncoder(cfg["model_name"], cfg["weights"], layers=cfg["layers"], image_size=cfg.get("image_size"))
    raise ValueError(f"bayes-pfl: unknown encoder type {kind!r} in the model file; pass encoder= to load()")
