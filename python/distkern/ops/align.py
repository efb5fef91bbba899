r"""Prompt alignment for CLIP-style zero-shot anomaly detection: the fused anomaly map.

For patch tokens ``x`` of L layers and K (normal, abnormal) prompt pairs ``(t₀, t₁)`` with
temperature τ, the abnormal probability of a patch under one pair is the softmax over the pair of
the temperature-scaled cosine similarities — which is ``σ(x̂ · d)`` with ``d = τ(t̂₁ − t̂₀)``. The
map is its mean over pairs and layers (Bayes-PFL averages 30 pairs × 4 layers). The op
``torch.ops.distkern.anomaly_map(patches, dirs)`` reads each patch token once, normalises it on the
fly and never stores the normalised tokens or the (B, P, 2K) similarities.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ._call import call
from ._cpu import bmm
from ._fake import same_device

__all__ = ["anomaly_map", "pair_directions", "image_scores", "topk_mean", "prompt_align", "shared_kv_attention",
           "attention_tile"]


def pair_directions(text: torch.Tensor, temperature=1.0 / 0.07) -> torch.Tensor:
    """``τ(t̂₁ − t̂₀)`` for prompt pairs ``text (..., K, 2, D)`` (index 0 normal, 1 abnormal) → ``(..., K, D)``.

    Differentiable in ``text`` and ``temperature`` (a float or a learnable 0-d tensor).
    """
    if text.dim() < 3 or text.shape[-2] != 2:
        raise ValueError("distkern.anomaly_map: text must be (..., K, 2, D) prompt pairs (normal, abnormal); got shape "
                         f"{tuple(text.shape)}")
    if not text.is_floating_point():
        raise TypeError(f"distkern.anomaly_map: text must be a floating-point tensor; got {text.dtype}")
    t = torch.nn.functional.normalize(text.float() if text.dtype in (torch.float16, torch.bfloat16) else text, dim=-1)
    return temperature * (t[..., 1, :] - t[..., 0, :])


def anomaly_map(patches, text: torch.Tensor, temperature=1.0 / 0.07) -> torch.Tensor:
    r"""Mean abnormal probability per patch over prompt pairs and layers.

    Args:
        patches: ``(L, B, P, D)`` patch tokens of L layers (or ``(B, P, D)`` for one layer, or a list of L
            ``(B, P, D)`` tensors — stacked first, which copies them), float32 / float16 / bfloat16 / float64;
            any norm (they are L2-normalised in the kernel, ``x / max(‖x‖, 1e-12)``).
        text: prompt embeddings ``(K, 2, D)`` shared by layers and images, ``(L, K, 2, D)`` per layer, or
            ``(L, B, K, 2, D)`` per layer and image (the output of residual cross-modal attention); index
            0 of the pair is the normal prompt, 1 the abnormal one. Normalised here.
        temperature: τ (Bayes-PFL learns it, initialised at 1/0.07); a float or a 0-d tensor.

    Returns:
        ``(B, P)`` float32 (float64 for float64 patches): ``mean_{l,k} softmax(τ cos(x, t₀), τ cos(x, t₁))[1]``.
        Differentiable in ``patches``, ``text`` and ``temperature``.
    """
    if isinstance(patches, Sequence) and not isinstance(patches, torch.Tensor):
        if len(patches) == 0:
            raise ValueError("distkern.anomaly_map: patches is an empty list; give at least one layer's (B, P, D) "
                             "tokens")
        patches = torch.stack(list(patches))
    if not isinstance(patches, torch.Tensor):
        raise TypeError("distkern.anomaly_map: patches must be a tensor (L, B, P, D) or a list of (B, P, D) tensors")
    if patches.dim() not in (3, 4):
        raise ValueError("distkern.anomaly_map: patches must be (B, P, D) tokens of one layer or (L, B, P, D) of L "
                         f"layers; got shape {tuple(patches.shape)}")
    if patches.dim() == 3:
        patches = patches[None]
    _check_text(text, patches)
    dirs = pair_directions(text, temperature)
    if patches.dtype == torch.float64:
        dirs = dirs.double()
    return call(torch.ops.distkern.anomaly_map, patches, dirs)


def _check_text(text, patches: torch.Tensor) -> None:
    """The prompt pairs' shape against the (L, B, P, D) patches, in the wrapper's own terms (the op below sees
    the pair directions, whose messages would name ``dirs``)."""
    if not isinstance(text, torch.Tensor):
        raise TypeError(f"distkern.anomaly_map: text must be a tensor of prompt pairs; got {type(text).__name__}")
    L, B, _, D = patches.shape
    shape = tuple(text.shape)
    if text.dim() not in (3, 4, 5) or text.shape[-2] != 2:
        raise ValueError("distkern.anomaly_map: text must be prompt pairs (K, 2, D), (L, K, 2, D) per layer or "
                         f"(L, B, K, 2, D) per layer and image (index 0 normal, 1 abnormal); got shape {shape}")
    if text.shape[-1] != D:
        raise ValueError(f"distkern.anomaly_map: text has D = {text.shape[-1]} features per prompt but patches have "
                         f"D = {D}; got text {shape}, patches {tuple(patches.shape)}")
    if text.dim() >= 4 and text.shape[0] != L:
        raise ValueError(f"distkern.anomaly_map: per-layer text {shape} must have the patches' L = {L} layers")
    if text.dim() == 5 and text.shape[1] != B:
        raise ValueError(f"distkern.anomaly_map: per-image text {shape} must have the patches' B = {B} images")


def topk_mean(amap: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest values of each map ``(B, P)`` (or ``(B, H, W)``) → ``(B,)``."""
    flat = amap.reshape(amap.shape[0], -1)
    k = max(1, min(int(k), flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


def _minmax(v: torch.Tensor) -> torch.Tensor:
    lo, hi = v.min(), v.max()
    return (v - lo) / (hi - lo).clamp_min(torch.finfo(v.dtype).tiny)


def image_scores(amap: torch.Tensor, text_score: torch.Tensor | None = None, *, k: int = 2000,
                 weight: float = 0.5) -> torch.Tensor:
    """Bayes-PFL's image score over a set of images: ``w·minmax(text_score) + (1−w)·minmax(topk_mean(map, k))``
    (k = 2000 by default, 20 for small defects); without ``text_score`` the min-max-normalised top-k mean.
    Min-max runs over the batch, so score the whole test set together."""
    s = _minmax(topk_mean(amap, k))
    if text_score is None:
        return s
    return weight * _minmax(text_score.to(s.dtype).reshape(-1)) + (1 - weight) * s


# Tokens per step of the tiled attention. On the CPU, 256 (a step's scores stay in cache). On a GPU each step
# is ~15 launches (two GEMMs and the online softmax's elementwise updates; twice that in the backward): the
# first H200 run timed prompt_align's forward at 0.40x eager at Bayes-PFL's shapes with 256, launch-bound.
# There a step takes as many tokens as keep its (B, M, tile) scores under _GPU_STEP_SCORES elements (64 MiB
# in float32; the backward holds ~8 such at once, ~0.5 GiB): all P = 1369 up to B = 32 at H·T = 240 queries.
_CPU_TILE = 256
_GPU_STEP_SCORES = 1 << 24


def attention_tile(q: torch.Tensor, x: torch.Tensor, tile: int | None = None) -> int:
    """The tokens per step :func:`shared_kv_attention` streams for ``q (B, M, D)``, ``x (B, P, D)``: ``tile``
    if given, else 256 on the CPU and, on a GPU, the largest count whose scores fit 2²⁴ elements a step
    (at least 256, at most P)."""
    if tile is not None:
        return int(tile)
    if x.device.type == "cpu":
        return _CPU_TILE
    B, M, P = q.shape[0], q.shape[1], x.shape[1]
    return int(max(1, min(P, max(_CPU_TILE, _GPU_STEP_SCORES // max(1, B * M)))))


def shared_kv_attention(q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                        tile: int | None = None):
    """``softmax(q xᵀ) x`` over the P tokens of ``x (B, P, D)`` for queries ``q (B, M, D)`` (keys = values = x),
    streamed in tiles with an online softmax. ``mask (B, P)`` bool: True for tokens to attend to; a row with
    no token to attend to gets output 0 and log-sum-exp −inf (as ``scaled_dot_product_attention``), and zero
    gradients.
    Returns ``(out (B, M, D) in q's dtype, log-sum-exp (B, M) float32/float64)``; differentiable in q and x
    by a flash-style backward (the (B, M, P) probabilities are recomputed tile by tile, never stored).
    ``tile``: tokens per step; None picks it (:func:`attention_tile`: 256 on the CPU, up to all P on a GPU)."""
    return call(torch.ops.distkern.shared_kv_attention, q, x, mask, attention_tile(q, x, tile))


def prompt_align(text: torch.Tensor, patches: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor | None,
                 w_v: torch.Tensor | None, heads: int, *, b_q: torch.Tensor | None = None, b_k: torch.Tensor | None = None,
                 b_v: torch.Tensor | None = None, scale: float | None = None, mask: torch.Tensor | None = None,
                 tile: int | None = None) -> torch.Tensor:
    r"""Residual cross-modal attention (Bayes-PFL's RCA): text queries attend over patch tokens, the attended
    values are added back to the text, and the sum is L2-normalised.

    ``out = normalize(text + concat_h softmax_p(scale · q_h · k_{h,p}) v_{h,p})`` with ``q = text·w_q + b_q``,
    ``k = patches·w_k + b_k``, ``v = patches·w_v + b_v`` split into ``heads`` heads. Computed without ever
    projecting the P tokens: the queries are mapped into the token space (``q̃_h = scale · q_h w_{k,h}ᵀ``),
    one attention with keys = values = patches runs for all heads at once (:func:`shared_kv_attention`),
    and its (H·T, D) result is projected by ``w_v``. Key biases cancel in the softmax; value biases pass
    through it. At Bayes-PFL's shapes (T = 60, P = 1369, D = E = 768, H = 4) that is ~3× fewer FLOPs than
    projecting the tokens, and no (B, H, T, P) probabilities exist (the backward recomputes them in tiles).

    Args:
        text: ``(T, Dt)`` prompt embeddings shared by the batch, or ``(B, T, Dt)``.
        patches: ``(B, P, D)`` patch tokens (already projected to the joint space, as Bayes-PFL's per-layer
            linear does). mask: optional ``(B, P)`` bool, False for padded tokens; an image with every token
            masked attends to nothing (its attention term is 0, as in ``scaled_dot_product_attention``).
        tile: tokens per step of the attention (None: :func:`attention_tile` picks it for the device).
        w_q: ``(Dt, E)``, w_k: ``(D, E)``, w_v: ``(D, Dt)`` — ``(in, out)`` matrices, i.e. ``linear.weight.T``.
            ``w_k = w_v = None``: keys = values = the tokens themselves, split into heads along D (Bayes-PFL's
            RCA, whose tokens are already projected); then ``E = D = Dt``.
        heads: H, dividing E and Dt. scale: default ``(E / H) ** -0.5`` (Bayes-PFL uses ``E ** -0.5``).

    Returns ``(B, T, Dt)`` unit vectors in text's dtype. Differentiable in every tensor argument.
    """
    if text.dim() not in (2, 3) or patches.dim() != 3:
        raise ValueError(f"distkern.prompt_align: text must be (T, Dt) or (B, T, Dt) and patches (B, P, D); got "
                         f"{tuple(text.shape)} and {tuple(patches.shape)}")
    B, P, D = patches.shape
    T, Dt = text.shape[-2], text.shape[-1]
    if text.dim() == 3 and text.shape[0] != B:
        raise ValueError(f"distkern.prompt_align: text (B, T, Dt) must have the patches' B = {B}; got {tuple(text.shape)}")
    if w_q.dim() != 2 or w_q.shape[0] != Dt:
        raise ValueError(f"distkern.prompt_align: w_q must be (Dt, E) with Dt = {Dt}; got {tuple(w_q.shape)}")
    E = w_q.shape[1]
    identity = w_k is None or w_v is None
    if identity:
        if w_k is not None or w_v is not None or b_k is not None:
            raise ValueError("distkern.prompt_align: give both w_k and w_v, or neither (keys = values = patches)")
        if not (E == D == Dt):
            raise ValueError(f"distkern.prompt_align: without w_k / w_v the widths must agree: E = D = Dt; got "
                             f"E = {E}, D = {D}, Dt = {Dt}")
        if not isinstance(heads, int) or heads < 1 or D % heads:
            raise ValueError(f"distkern.prompt_align: heads must divide D = {D}; got {heads!r}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (B, P)):
            raise ValueError(f"distkern.prompt_align: mask must be a (B, P) = ({B}, {P}) bool tensor; got "
                             f"{tuple(mask.shape)} {mask.dtype}")
    else:
        if w_k.shape != (D, E):
            raise ValueError(f"distkern.prompt_align: w_k must be (D, E) = ({D}, {E}); got {tuple(w_k.shape)}")
        if w_v.shape != (D, Dt):
            raise ValueError(f"distkern.prompt_align: w_v must be (D, Dt) = ({D}, {Dt}) (the residual adds it to "
                             f"the text); got {tuple(w_v.shape)}")
        if not isinstance(heads, int) or heads < 1 or E % heads or Dt % heads:
            raise ValueError(f"distkern.prompt_align: heads must divide E = {E} and Dt = {Dt}; got {heads!r}")
    for nm, bias, width in (("b_q", b_q, E), ("b_k", b_k, E), ("b_v", b_v, Dt)):
        if bias is not None and tuple(bias.shape) != (width,):
            raise ValueError(f"distkern.prompt_align: {nm} must be a ({width},) vector; got {tuple(bias.shape)}")
    H, e = heads, E // heads
    sc = float(scale) if scale is not None else e ** -0.5
    q = text @ w_q
    if b_q is not None:
        q = q + b_q
    q = sc * q
    q = q.expand(B, T, E) if q.dim() == 2 else q
    if identity:
        attn = _attend_heads(q, patches, H, mask, tile)
    else:
        attn = _attend_projected(q, patches, w_k, w_v, H, mask, tile)
    if b_v is not None:  # the value bias passes through softmax weights that sum to 1 — to 0 for an image with
        # no token left by the mask, which attends to nothing (as scaled_dot_product_attention gives it 0)
        attn = attn + (b_v if mask is None else b_v * mask.any(1).to(attn.dtype)[:, None, None])
    return torch.nn.functional.normalize(text + attn, dim=-1)


def _attend_projected(q, patches, w_k, w_v, H, mask, tile):
    """Heads of projected keys / values, in token space: q̃_h = q_h W_k,hᵀ, one attention of H·T queries over
    keys = values = the tokens, then W_v,h per head and the heads concatenated → (B, T, Dt)."""
    B, T, E = q.shape
    D, Dt = w_v.shape
    e, ev = E // H, Dt // H
    qh = q.reshape(B, T, H, e).transpose(1, 2)  # (B, H, T, e)
    qt = qh @ w_k.reshape(D, H, e).permute(1, 2, 0)  # (B, H, T, D)
    o, _ = shared_kv_attention(qt.reshape(B, H * T, D).to(patches.dtype), patches, mask, tile=tile)
    o = o.reshape(B, H, T, D).to(q.dtype)
    return (o @ w_v.reshape(D, H, ev).permute(1, 0, 2)).transpose(1, 2).reshape(B, T, Dt)


def _attend_heads(q, patches, H, mask, tile):
    """Keys = values = the tokens, heads splitting D: B·H attentions of the T queries of a head over its slice
    of the tokens (one head-major copy of the tokens) → (B, T, D)."""
    B, T, D = q.shape
    P, e = patches.shape[1], D // H
    qh = q.reshape(B, T, H, e).transpose(1, 2).reshape(B * H, T, e)
    xh = patches.reshape(B, P, H, e).transpose(1, 2).reshape(B * H, P, e)
    mh = mask.repeat_interleave(H, 0) if mask is not None else None
    o, _ = shared_kv_attention(qh.to(patches.dtype), xh, mh, tile=tile)
    return o.to(q.dtype).reshape(B, H, T, e).transpose(1, 2).reshape(B, T, D)


# ---------------------------------------------------------------------------------------------------------------
# fake and autograd registrations

@torch.library.register_fake("distkern::shared_kv_attention")
def _fake_attn(q, x, mask=None, tile=256):
    same_device("distkern.shared_kv_attention", q=q, x=x, mask=mask)
    torch._check(q.dim() == 3 and x.dim() == 3, lambda: "distkern.shared_kv_attention: q (B, M, D), x (B, P, D)")
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=dt)


def _setup_attn(ctx, inputs, output):
    q, x, mask, tile = inputs
    out, lse = output
    ctx.save_for_backward(q, x, mask, out, lse)
    ctx.tile = tile


def _backward_attn(ctx, grad_out, grad_lse):
    # Flash-style: probabilities recomputed per tile from the saved log-sum-exp.
    q, x, mask, out, lse = ctx.saved_tensors
    acc = lse.dtype
    qa, oa = q.to(acc), out.to(acc)
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # all-masked rows: exp(−inf − 0) = 0, not NaN
    go = grad_out.to(acc) if grad_out is not None else torch.zeros_like(oa)
    delta = (go * oa).sum(-1, keepdim=True)  # (B, M, 1)
    need_q, need_x = ctx.needs_input_grad[:2]
    gq = torch.zeros_like(qa) if need_q else None
    gx = torch.empty(x.shape, dtype=acc, device=x.device) if need_x else None
    P = x.shape[1]
    qgo = torch.cat([qa, go], 1)  # (B, 2M, D): the two products with each tile's tokens as one
    M = qa.shape[1]
    for p0 in range(0, P, ctx.tile):
        xt = x[:, p0:p0 + ctx.tile].to(acc)
        sg = bmm(qgo, xt.transpose(1, 2))
        s, gs = sg[:, :M], sg[:, M:]
        if mask is not None:
            s = s.masked_fill(~mask[:, None, p0:p0 + ctx.tile], float("-inf"))
        pt = torch.exp(s - lse[..., None])
        ds = pt * (gs - delta)
        if grad_lse is not None:
            ds = ds + pt * grad_lse[..., None].to(acc)
        if need_q:
            gq += bmm(ds, xt)
        if need_x:  # dsᵀ·q + ptᵀ·go as one product over the stacked rows
            gx[:, p0:p0 + ctx.tile] = bmm(torch.cat([ds, pt], 1).transpose(1, 2), qgo)
    return (gq.to(q.dtype) if need_q else None), (gx.to(x.dtype) if need_x else None), None, None


torch.library.register_autograd("distkern::shared_kv_attention", _backward_attn, setup_context=_setup_attn)


@torch.library.register_fake("distkern::anomaly_map")
def _fake(patches, dirs):
    same_device("distkern.anomaly_map", patches=patches, dirs=dirs)
    torch._check(patches.dim() == 4, lambda: "distkern.anomaly_map: patches must be (L, B, P, D)")
    dt = torch.float64 if patches.dtype == torch.float64 else torch.float32
    return patches.new_empty((patches.shape[1], patches.shape[2]), dtype=dt)


def _setup(ctx, inputs, output):
    patches, dirs = inputs
    ctx.save_for_backward(patches, dirs)


def _backward(ctx, grad):
    # Recomputes, one layer at a time, what the forward did on the fly (a (B, P, D) temporary per layer).
    patches, dirs = ctx.saved_tensors
    L, B, P, D = patches.shape
    acc = grad.dtype
    d4 = dirs.to(acc)
    if d4.dim() == 2:
        d4 = d4[None, None]
    elif d4.dim() == 3:
        d4 = d4[:, None]
    K = d4.shape[-2]
    need_x, need_d = ctx.needs_input_grad[:2]
    gx = torch.empty_like(patches) if need_x else None
    gd = torch.zeros_like(d4) if need_d else None
    scale = grad[..., None] / (L * K)  # (B, P, 1)
    for layer in range(L):
        x = patches[layer].to(acc)
        n = x.norm(dim=-1, keepdim=True)
        nc = n.clamp_min(1e-12)
        xh = x / nc
        dl = d4[layer if d4.shape[0] > 1 else 0].expand(B, K, D)
        s = torch.sigmoid(xh @ dl.transpose(1, 2))  # (B, P, K)
        dz = scale * s * (1 - s)
        if need_d:
            g = dz.transpose(1, 2) @ xh  # (B, K, D)
            li = layer if d4.shape[0] > 1 else 0
            gd[li] += g if d4.shape[1] > 1 else g.sum(0, keepdim=True)
        if need_x:
            gxh = dz @ dl  # (B, P, D)
            inside = n > 1e-12
            gxl = torch.where(inside, (gxh - (gxh * xh).sum(-1, keepdim=True) * xh) / nc, gxh / nc)
            gx[layer] = gxl.to(patches.dtype)
    if need_d:
        gd = gd.reshape(dirs.shape).to(dirs.dtype)
    return gx, gd


torch.library.register_autograd("distkern::anomaly_map", _backward, setup_context=_setup)
