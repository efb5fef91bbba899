"""Benchmark cases of the prompt-alignment ops (``distkern.ops.align``) at Bayes-PFL's shapes.

Bayes-PFL (xiaozhen228/Bayes-PFL, models/VPB.py): CLIP ViT-L/14-336 at 518 px gives 37×37 = 1369 patch
tokens in each of the layers 6/12/18/24 (L = 4), projected to D = 768; 60 text embeddings (2 states × 3
prompts × 10 samples: K = 30 (normal, abnormal) pairs) are refined per image and layer by the residual
cross-modal attention (RCA: 4 heads, scale 768^-0.5) and compared with the normalised patch tokens.

* ``anomaly_map``: the map from the per-layer, per-image prompts ``(L, B, K, 2, D)``. Baselines: the
  per-layer loop as Bayes-PFL writes it (normalise, ``τ · patches @ textᵀ`` against both prompts of all
  pairs, softmax over each pair, mean) — primary — and the same with one einsum over all layers.
  Count model: the patch tokens read once (L·B·P·D·elem) + the (B, P) float32 map written; FLOPs
  2·L·B·P·D·K (one dot product per pair: ``σ(x̂ · τ(t̂₁ − t̂₀))``; the eager form does twice that).
* ``prompt_align``: RCA with projections ``k = x W_k``, ``v = x W_v``, ``q = t W_q + b_q``. Baselines: the
  eager composition (project the P tokens, split heads, softmax(scale · q kᵀ) v, concat, residual,
  normalise) — primary — and the same attention through ``F.scaled_dot_product_attention``. Ours never
  projects the tokens: FLOPs 4·B·H·T·P·D (token-space attention) + 2·B·T·(Dt·E + E·D + D·Dt)
  (projections of the queries and of the result); the eager form does 4·B·P·D·E (the two token
  projections) + 4·B·T·P·E. Bytes: the tokens read once, the weights read, the output written.
  The forward+backward cases take the gradients w.r.t. text, patches, W_q, b_q, W_k and W_v of a fixed
  random linear functional of the output (flash-style backward: ~10·B·H·T·P·D more FLOPs; the tokens
  read again and their gradient written); their agreement tolerance is 2e-2 (element-wise relative error
  of gradients with cancellation — the eager baselines differ from a float64 run by as much).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .cases import Case, dtype_name

Inputs = dict[str, Any]

_TAU = 1.0 / 0.07  # Bayes-PFL's temperature_pixel.exp() at initialisation
_L, _P, _D, _K = 4, 1369, 768, 30  # layers, 37×37 tokens, joint width, prompt pairs
_T, _H = 60, 4  # text embeddings (2 × 30), RCA heads
_SCALE = 768**-0.5  # Bayes-PFL: dim_out ** -0.5 (not per head)


def _gen(device, seed: int, *salt: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((1_000_003 * (seed + 1) + sum(7919**i * s for i, s in enumerate(salt, 1))) % 2**62)
    return g


# ---------------------------------------------------------------------------------------------
# anomaly_map
# ---------------------------------------------------------------------------------------------


def _map_setup(L: int, B: int, P: int, D: int, K: int):
    def setup(device, dtype: torch.dtype, *, seed: int = 0) -> Inputs:
        device = torch.device(device)
        g = _gen(device, seed, L, B, P, D, K)
        # CLIP-like tokens: a shared component (cosines to the prompts ~0.1-0.3), norms ~ 10
        common = torch.randn(D, generator=g, device=device)
        patches = 3.0 * torch.randn(L, B, P, D, generator=g, device=device) + 2.0 * common
        text = torch.randn(L, B, K, 2, D, generator=g, device=device) + common  # RCA output, per layer and image
        return {
            "patches": patches.to(dtype),
            "text": text,  # (L, B, K, 2, D): pairs (normal, abnormal)
            # the same prompts in Bayes-PFL's layout: (L, B, 2K, D), the K normal ones then the K abnormal ones
            "text_bpfl": torch.cat([text[..., 0, :], text[..., 1, :]], dim=2).contiguous(),
        }

    return setup


def _map_ours(i: Inputs):
    from ..ops.align import anomaly_map

    return anomaly_map(i["patches"], i["text"], _TAU)


def _map_eager(i: Inputs):
    # Bayes-PFL, per layer: dense = x / ‖x‖; τ · dense @ textᵀ → (B, P, 2K); softmax over each
    # (normal, abnormal) pair → abnormal probability; mean over the pairs, then over the layers.
    patches, text = i["patches"], i["text_bpfl"]
    L, K = patches.shape[0], text.shape[2] // 2
    total = None
    for layer in range(L):
        x = patches[layer]
        if x.dtype != torch.float32:
            x = x.float()
        dense = x / x.norm(dim=-1, keepdim=True)
        t = text[layer] / text[layer].norm(dim=-1, keepdim=True)
        logits = _TAU * dense @ t.transpose(1, 2)  # (B, P, 2K)
        pair = torch.stack([logits[..., :K], logits[..., K:]], dim=-1)  # (B, P, K, 2)
        m = pair.softmax(dim=-1)[..., 1].mean(dim=-1)
        total = m if total is None else total + m
    return total / L


def _map_eager_einsum(i: Inputs):
    # All layers at once: F.normalize + one einsum against (normal, abnormal) of every pair.
    x = i["patches"]
    if x.dtype != torch.float32:
        x = x.float()
    logits = _TAU * torch.einsum("lbpd,lbksd->lbpks", F.normalize(x, dim=-1), F.normalize(i["text"], dim=-1))
    return logits.softmax(dim=-1)[..., 1].mean(dim=(0, 3))


def _map_case(B: int, dtype: torch.dtype, devices, *, L=_L, P=_P, D=_D, K=_K, quick=False, note=""):
    elem = torch.empty((), dtype=dtype).element_size()
    return Case(
        op="anomaly_map",
        label=f"L={L} B={B} P={P} D={D} K={K} {dtype_name(dtype)}",
        params={"L": L, "B": B, "P": P, "D": D, "K": K},
        dtype=dtype,
        setup=_map_setup(L, B, P, D, K),
        ours=_map_ours,
        baselines={"eager": _map_eager, "eager-einsum": _map_eager_einsum},
        bytes=L * B * P * D * elem + B * P * 4,
        flops=2 * L * B * P * D * K,
        devices=tuple(devices),
        quick=quick,
        note=note,
    )


# ---------------------------------------------------------------------------------------------
# prompt_align (RCA)
# ---------------------------------------------------------------------------------------------


def _rca_setup(B: int, T: int, P: int, D: int, E: int, Dt: int):
    def setup(device, dtype: torch.dtype, *, seed: int = 0) -> Inputs:
        device = torch.device(device)
        g = _gen(device, seed, B, T, P, D, E, Dt)

        def r(*shape, s=1.0):
            return (s * torch.randn(*shape, generator=g, device=device)).to(dtype)

        # unit-scale tokens and prompts, weights ~ N(0, 1/in): scores ~ N(0, 1), a non-trivial softmax
        return {
            "text": r(B, T, Dt),  # per image (Bayes-PFL's image-specific prompt samples)
            "patches": r(B, P, D),
            "w_q": r(Dt, E, s=Dt**-0.5),
            "b_q": r(E, s=0.1),
            "w_k": r(D, E, s=D**-0.5),
            "w_v": r(D, Dt, s=D**-0.5),
            "grad_out": r(B, T, Dt),  # the fixed functional of the forward+backward cases
        }

    return setup


def _rca_ours_fn(i: Inputs, text, patches, w_q, b_q, w_k, w_v):
    from ..ops.align import prompt_align

    return prompt_align(text, patches, w_q, w_k, w_v, _H, b_q=b_q, scale=_SCALE)


def _rca_eager_fn(i: Inputs, text, patches, w_q, b_q, w_k, w_v):
    # Bayes-PFL's Zero_Parameter (RCA) with key / value projections: heads split by reshape, einsum scores,
    # softmax over the tokens, einsum back, concat, residual, x / ‖x‖.
    B, T, Dt = text.shape
    P, E = patches.shape[1], w_q.shape[1]
    q = (text @ w_q + b_q).reshape(B, T, _H, E // _H)
    k = (patches @ w_k).reshape(B, P, _H, E // _H)
    v = (patches @ w_v).reshape(B, P, _H, Dt // _H)
    attn = (torch.einsum("bnkc,bmkc->bknm", q, k) * _SCALE).softmax(dim=-1)
    out = torch.einsum("bknm,bmkc->bnkc", attn, v).reshape(B, T, Dt) + text
    return out / out.norm(dim=-1, keepdim=True)


def _rca_sdpa_fn(i: Inputs, text, patches, w_q, b_q, w_k, w_v):
    # The same with torch's fused attention: (B, H, ·, e) heads, scale given explicitly.
    B, T, Dt = text.shape
    P, E = patches.shape[1], w_q.shape[1]
    q = (text @ w_q + b_q).reshape(B, T, _H, E // _H).transpose(1, 2)
    k = (patches @ w_k).reshape(B, P, _H, E // _H).transpose(1, 2)
    v = (patches @ w_v).reshape(B, P, _H, Dt // _H).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=_SCALE).transpose(1, 2).reshape(B, T, Dt) + text
    return F.normalize(out, dim=-1)


_RCA_ARGS = ("text", "patches", "w_q", "b_q", "w_k", "w_v")


def _forward(fn):
    def run(i: Inputs):
        return fn(i, *(i[k] for k in _RCA_ARGS))

    return run


def _forward_backward(fn):
    def run(i: Inputs):
        with torch.enable_grad():  # the harness times under no_grad
            args = [i[k].detach().requires_grad_() for k in _RCA_ARGS]
            out = fn(i, *args)
            grads = torch.autograd.grad(out, args, i["grad_out"])
        # each gradient in units of its own RMS: the harness' error is element-wise, floored at 1e-3 of the
        # median magnitude, and the weights' gradients (sums over B·T·P) dwarf the tokens' by orders
        return torch.cat([(g / (g.norm() / g.numel() ** 0.5).clamp_min(1e-30)).reshape(-1) for g in grads])

    return run


def _rca_case(B: int, dtype: torch.dtype, devices, *, backward=False, T=_T, P=_P, D=_D, E=_D, Dt=_D, quick=False,
              note=""):
    elem = torch.empty((), dtype=dtype).element_size()
    attn = 4 * B * _H * T * P * D
    proj = 2 * B * T * (Dt * E + E * D + D * Dt)
    eager = 4 * B * P * D * E + 4 * B * T * P * E
    weights = (Dt * E + E + D * E + D * Dt) * elem
    io = B * T * Dt * elem * 2  # text read, output written
    if backward:
        flops = attn + 10 * B * _H * T * P * D + 3 * proj
        nbytes = 3 * B * P * D * elem + 2 * weights + 2 * io
        eager_flops = 3 * eager
    else:
        flops = attn + proj
        nbytes = B * P * D * elem + weights + io
        eager_flops = eager
    return Case(
        op="prompt_align",
        label=f"{'fwd+bwd' if backward else 'fwd'} B={B} T={T} P={P} D={D} H={_H} {dtype_name(dtype)}",
        params={"B": B, "T": T, "P": P, "D": D, "E": E, "Dt": Dt, "H": _H},
        dtype=dtype,
        setup=_rca_setup(B, T, P, D, E, Dt),
        ours=(_forward_backward if backward else _forward)(_rca_ours_fn),
        baselines={
            "eager": (_forward_backward if backward else _forward)(_rca_eager_fn),
            "sdpa": (_forward_backward if backward else _forward)(_rca_sdpa_fn),
        },
        bytes=nbytes,
        flops=flops,
        devices=tuple(devices),
        quick=quick,
        note=(note + "; " if note else "") + f"eager FLOPs ~{eager_flops / 1e9:.3g} G (projects the P tokens)",
        # gradients: sums with cancellation; against float64 every part of ours, eager and SDPA is within
        # ~6e-7 of its norm, but the element-wise error of near-zero entries reaches ~3e-3 (eager's own, B=8)
        tol=1e-2 if backward else None,
    )


# ---------------------------------------------------------------------------------------------


def align_cases() -> list[Case]:
    cpu, cuda, both = ("cpu",), ("cuda",), ("cpu", "cuda")
    f32, bf16 = torch.float32, torch.bfloat16
    grads = "gradients w.r.t. text, patches, W_q, b_q, W_k, W_v"
    return [
        # anomaly_map: Bayes-PFL's shapes, prompts per layer and image
        _map_case(1, f32, both, note="one image"),
        _map_case(8, f32, both),
        _map_case(32, f32, cuda),
        _map_case(1, bf16, cuda, note="bf16 tokens, fp32 prompts; baselines convert x.float() first"),
        _map_case(8, bf16, cuda, note="bf16 tokens, fp32 prompts; baselines convert x.float() first"),
        _map_case(32, bf16, cuda, note="bf16 tokens, fp32 prompts; baselines convert x.float() first"),
        # prompt_align forward
        _rca_case(1, f32, both),
        _rca_case(8, f32, both),
        _rca_case(32, f32, cuda),
        # prompt_align forward + backward
        _rca_case(1, f32, cpu, backward=True, note=grads + " (B = 1 on the CPU: time budget)"),
        _rca_case(8, f32, cuda, backward=True, note=grads),
        _rca_case(32, f32, cuda, backward=True, note=grads),
        # quick suite
        _map_case(2, f32, both, L=2, P=100, D=64, K=5, quick=True),
        _rca_case(2, f32, both, T=12, P=100, D=64, E=64, Dt=64, quick=True),
    ]


__all__ = ["align_cases"]
