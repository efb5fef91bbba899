r"""Does analytical teleportation help at a fixed number of model evaluations? A measurement on a Gaussian mixture
whose exact denoiser is known, so that every error is the sampler's.

    python -m distkern_gaussian_teleport.demo [--quick] [--dim 8|2] [--seed 0] [--plot out.png]

1. Data: :func:`~distkern_gaussian_teleport.gmm.demo_mixture` (8 anisotropic components, unequal weights; 8-D by
   default); a training set (for the Gaussian fit) and a held-out set (for the metrics).
2. Model: the mixture's exact denoiser, wrapped as an ε-prediction model for the schedulers' DDPM schedule
   (linear β 1e-4 … 0.02, 1000 steps, σ from 0.01 to 157).
3. Teleportation: a full-rank Gaussian fitted to the training set (:meth:`GaussianTeleport.fit`).
4. Samplers: :class:`distkern.diffusion.EulerDiscreteScheduler` and
   :class:`distkern.diffusion.DPMSolverMultistepScheduler` (DPM-Solver++ 2M), default configs, at NFE 3 … 35, each
   without teleportation and with the first 20 / 30 / 40 % of the diffusion time replaced by the teleport: to
   ``σ_skip = σ(t = (1 − skip)·999)`` = 25.0 / 11.8 / 6.1. The NFE model evaluations then run on the tail of the
   scheduler's own schedule: the shortest one with NFE steps at ``σ ≤ σ_skip`` (``sigma_skip=`` of
   :class:`GaussianTeleport`). The same initial noise for every run.
5. Metrics against the held-out set: unbiased MMD² (:func:`distkern.mmd2`, Gaussian kernel) at a quarter of the
   held-out set's median distance (the median itself, ≈ the distance between modes, mostly sees the mode weights;
      its values are returned too as ``mmd2_median``) and the sliced 2-Wasserstein distance (256 fixed directions).
   Reference rows: the metrics' noise floor (5 fresh samples of the mixture itself, mean and largest value), the
   fitted Gaussian alone (teleporting all the way to σ = 0) and DPM-Solver++ with 200 steps (50 with ``--quick``;
   ≈ the exact ODE).

:func:`run` returns the numbers (a :class:`DemoResult`); ``main`` prints the table and writes a plot when
matplotlib is installed.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from dataclasses import dataclass, field

import torch

import distkern

from .convert import epsilon_model, train_sigmas
from .gmm import demo_mixture
from .teleport import GaussianTeleport

__all__ = ["DemoResult", "run", "main", "sliced_wasserstein", "SAMPLERS"]

SAMPLERS = ("euler", "dpm", "ddim", "euler-karras", "dpm-karras")
_TITLES = {"euler": "Euler", "dpm": "DPM-Solver++ 2M", "ddim": "DDIM", "euler-karras": "Euler, Karras σ's",
           "dpm-karras": "DPM-Solver++ 2M, Karras σ's"}
FULL_NFES = (3, 5, 8, 12, 20, 35)
QUICK_NFES = (3, 5, 8, 12)
FULL_SKIPS = (0.0, 0.2, 0.3, 0.4)
QUICK_SKIPS = (0.0, 0.3)


def _scheduler(kind: str):
    from distkern.diffusion import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if kind == "euler":
        return EulerDiscreteScheduler()
    if kind == "dpm":
        return DPMSolverMultistepScheduler()
    if kind == "euler-karras":
        return EulerDiscreteScheduler(use_karras_sigmas=True)
    if kind == "dpm-karras":
        return DPMSolverMultistepScheduler(use_karras_sigmas=True)
    if kind == "ddim":
        return DDIMScheduler(clip_sample=False)
    raise ValueError(f"demo: sampler must be one of {SAMPLERS}; got {kind!r}")


def skip_sigma(scheduler, skip: float) -> float:
    """The VE σ at the training timestep ``(1 − skip)·(num_train_timesteps − 1)``: skipping ``skip`` of the
    diffusion time."""
    sig = train_sigmas(scheduler)
    return float(np.interp((1.0 - skip) * (len(sig) - 1), np.arange(len(sig)), sig))


def _teleporter(sampler: str, gaussian, skip: float) -> GaussianTeleport:
    sched = _scheduler(sampler)
    if skip == 0:
        return GaussianTeleport(sched, gaussian, skip_fraction=0.0)
    return GaussianTeleport(sched, gaussian, sigma_skip=skip_sigma(sched, skip))


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced 2-Wasserstein distance between equally sized samples ``(n, D)`` along ``(P, D)`` unit directions."""
    n = min(x.shape[0], y.shape[0])
    px = torch.sort((directions @ x[:n].double().T).contiguous(), dim=1).values  # (P, n)
    py = torch.sort((directions @ y[:n].double().T).contiguous(), dim=1).values
    return float(((px - py) ** 2).mean().sqrt())


@dataclass
class DemoResult:
    """``rows``: one dict per run (``sampler``, ``skip``, ``nfe``, ``sigma_skip``, ``sigma_max``, ``mmd2`` at
    ``settings["bandwidth"]``, ``mmd2_median`` at the median distance, ``sw``); ``reference``: ``{"floor": …,
    "floor_max": …, "gaussian": …, "dpm_ref": …}`` with the same metrics; ``settings``; ``seconds``."""

    rows: list = field(default_factory=list)
    reference: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def get(self, sampler: str, skip: float, nfe: int) -> dict:
        for r in self.rows:
            if r["sampler"] == sampler and abs(r["skip"] - skip) < 1e-12 and r["nfe"] == nfe:
                return r
        raise KeyError((sampler, skip, nfe))

    def table(self) -> str:
        s = self.settings
        skips = s["skips"]
        lines = [f"{s['dim']}-D Gaussian mixture, {s['n_samples']} samples vs {s['n_samples']} held-out, seed "
                 f"{s['seed']}; cells: MMD² ×10³ (Gaussian kernel, bandwidth {s['bandwidth']:.3f} = median "
                 f"distance / 4) / sliced W2"]
        w = max(7, *(len(x) for x in s["samplers"]))
        head = f"{'sampler':<{w}} {'NFE':>4} | " + " | ".join(
            ("no teleport" if k == 0 else f"skip {k:.0%}").center(17) for k in skips)
        lines += [head, "-" * len(head)]
        for sampler in s["samplers"]:
            for nfe in s["nfes"]:
                cells = []
                for k in skips:
                    r = self.get(sampler, k, nfe)
                    cells.append(f"{1e3 * r['mmd2']:8.3f} / {r['sw']:6.4f}")
                lines.append(f"{sampler:<{w}} {nfe:>4} | " + " | ".join(cells))
        for k in skips:
            if k > 0:
                sig = [r["sigma_skip"] for r in self.rows if abs(r["skip"] - k) < 1e-12]
                lines.append(f"skip {k:.0%}: teleport from σ = {s['sigma_max']:.1f} to the first kept step, σ ∈ "
                             f"[{min(sig):.2f}, {max(sig):.2f}] (σ_skip = {s['sigma_skip'][k]:.2f})")
        ref = self.reference
        lines.append("reference: " + "; ".join(f"{name} {1e3 * v['mmd2']:.3f} / {v['sw']:.4f}" for name, v in
                                               (("noise floor (fresh data; mean", ref["floor"]),
                                                ("largest of 5)", ref["floor_max"]),
                                                ("fitted Gaussian alone", ref["gaussian"]),
                                                (f"DPM-Solver++ {s['ref_steps']} steps", ref["dpm_ref"]))))
        lines.append(f"{self.seconds:.1f} s, {s['threads']} torch thread(s)")
        return "\n".join(lines)


def run(*, quick: bool = False, dim: int = 8, seed: int = 0, nfes=None, skips=None, samplers=("euler", "dpm"),
        n_samples: int | None = None, n_train: int = 20000, plot: str | None = None, verbose: bool = False,
        threads: int | None = 1) -> DemoResult:
    """Run the measurement (see the module docstring) and return the numbers. ``quick``: NFE 3/5/8/12, skip 0 and
    30 %, 2000 samples (default: NFE 3 … 35, skip 0/20/30/40 % of the diffusion time, 4000 samples).
    ``threads``: torch's intra-op threads during the run (restored after; ``None`` leaves them): the tensors are
    small (≤ 4000 × 8), and one thread is fastest, by far on a busy machine."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run(quick=quick, dim=dim, seed=seed, nfes=nfes, skips=skips, samplers=samplers, n_samples=n_samples,
                    n_train=n_train, plot=plot, verbose=verbose)
    finally:
        torch.set_num_threads(old_threads)


def _run(*, quick, dim, seed, nfes, skips, samplers, n_samples, n_train, plot, verbose) -> DemoResult:
    t0 = time.perf_counter()
    nfes = tuple(nfes or (QUICK_NFES if quick else FULL_NFES))
    skips = tuple(skips or (QUICK_SKIPS if quick else FULL_SKIPS))
    if 0.0 not in skips:
        skips = (0.0,) + skips
    n_samples = n_samples or (2000 if quick else 4000)
    for s in samplers:
        _scheduler(s)  # validates the name
    gmm = demo_mixture(dim, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    train = gmm.sample(n_train, g)
    held = gmm.sample(n_samples, g)
    held2 = gmm.sample(n_samples, g)
    noise = torch.randn(n_samples, dim, generator=g, dtype=torch.float64)
    directions = torch.nn.functional.normalize(torch.randn(256, dim, generator=g, dtype=torch.float64), dim=1)
    heldf = held.float()
    median = distkern.mmd.median_bandwidth(heldf)
    bandwidth = median / 4

    def metrics(x: torch.Tensor) -> dict:
        x = x.reshape(x.shape[0], -1).float()
        return {"mmd2": float(distkern.mmd2(x, heldf, bandwidth=bandwidth)),
                "mmd2_median": float(distkern.mmd2(x, heldf, bandwidth=median)),
                "sw": sliced_wasserstein(x, held, directions)}

    gaussian = GaussianTeleport(_scheduler("euler"), skip_fraction=0.0).fit(train).gaussian
    result = DemoResult(settings={"dim": dim, "seed": seed, "nfes": nfes, "skips": skips, "samplers": tuple(samplers),
                                  "n_samples": n_samples, "n_train": n_train, "bandwidth": bandwidth,
                                  "median_bandwidth": median, "ref_steps": 50 if quick else 200,
                                  "quick": quick, "threads": torch.get_num_threads()})
    for sampler in samplers:
        for skip in skips:
            tp = _teleporter(sampler, gaussian, skip)
            model = epsilon_model(gmm.denoise, tp.scheduler)
            for nfe in nfes:
                tp.set_timesteps(nfe)
                x_T = noise * tp.init_noise_sigma
                x = tp.sample(model, x_T, nfe)
                row = {"sampler": sampler, "skip": skip, "nfe": tp.nfe, "sigma_skip": tp.sigma_to,
                       "sigma_max": tp.sigma_from, **metrics(x)}
                result.rows.append(row)
                if verbose:
                    print(f"{sampler:<6} skip {skip:.0%} NFE {nfe:>3}: MMD² {1e3 * row['mmd2']:.3f}e-3 "
                          f"SW {row['sw']:.4f} (σ {tp.sigma_from:.1f} → {tp.sigma_to:.2f})", flush=True)
    result.settings["sigma_max"] = result.rows[0]["sigma_max"]
    result.settings["sigma_skip"] = {k: skip_sigma(_scheduler("euler"), k) for k in skips}
    # references
    gauss_only = GaussianTeleport(_scheduler("euler"), gaussian, skip_fraction=0.0)
    gauss_only.set_timesteps(1)
    x0 = gauss_only.teleport((noise * gauss_only.sigma_from), gauss_only.sigma_from, 0.0)
    ref = GaussianTeleport(_scheduler("dpm"), gaussian, skip_fraction=0.0)
    x_ref = ref.sample(epsilon_model(gmm.denoise, ref.scheduler), noise.clone(), result.settings["ref_steps"])
    g2 = torch.Generator().manual_seed(seed + 2)
    floors = [metrics(h) for h in [held2] + [gmm.sample(n_samples, g2) for _ in range(4)]]
    result.reference = {"floor": {k: sum(f[k] for f in floors) / len(floors) for k in floors[0]},
                        "floor_max": {k: max(f[k] for f in floors) for k in floors[0]},
                        "gaussian": metrics(x0), "dpm_ref": metrics(x_ref)}
    result.seconds = time.perf_counter() - t0
    if plot:
        result.settings["plot_written"] = _plot(result, plot)
    return result


def _plot(result: DemoResult, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return False
    s = result.settings
    fig, axes = plt.subplots(1, len(s["samplers"]), figsize=(5.5 * len(s["samplers"]), 4.2), squeeze=False)
    # MMD² estimates are unbiased and can be negative near 0: values below the noise floor (the largest of the 5
    # fresh-data estimates) are drawn on the shaded band at the bottom
    floor = max(result.reference["floor_max"]["mmd2"], 1e-6)
    for ax, sampler in zip(axes[0], s["samplers"]):
        for k in s["skips"]:
            ys = [max(result.get(sampler, k, n)["mmd2"], floor) for n in s["nfes"]]
            ax.plot(s["nfes"], ys, marker="o", label="no teleport" if k == 0 else f"teleport, skip {k:.0%}")
        ax.axhline(max(result.reference["gaussian"]["mmd2"], floor), color="gray", ls=":", lw=1,
                   label="fitted Gaussian alone")
        ax.axhspan(floor / 2, floor, color="gray", alpha=0.2, lw=0, label="≤ noise floor (DPM++ "
                   f"{s['ref_steps']} steps: {'below' if result.reference['dpm_ref']['mmd2'] <= floor else 'above'})")
        ax.set_ylim(bottom=floor / 2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(list(s["nfes"]), [str(n) for n in s["nfes"]])
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_ylabel(f"MMD² to held-out data (bandwidth {s['bandwidth']:.2f})")
        ax.set_title(_TITLES[sampler])
        ax.legend(fontsize=8)
    fig.suptitle(f"Gaussian teleportation, {s['dim']}-D mixture, exact denoiser")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> DemoResult:
    ap = argparse.ArgumentParser(prog="python -m distkern_gaussian_teleport.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer NFE values and skips, 2000 samples (< 30 s)")
    ap.add_argument("--dim", type=int, default=8, help="2 or ≥ 8 (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=None, help="generated and held-out samples")
    ap.add_argument("--samplers", default="euler,dpm", help=f"comma-separated, of {','.join(SAMPLERS)}")
    ap.add_argument("--nfes", default=None, help="comma-separated NFE values (default 3,5,8,12,20,35)")
    ap.add_argument("--skips", default=None, help="comma-separated skipped fractions of the diffusion time "
                                                  "(default 0.2,0.3,0.4; 0 = no teleport is always run)")
    ap.add_argument("--plot", default=None, metavar="PATH", help="write a PNG (needs matplotlib)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    nfes = tuple(int(v) for v in args.nfes.split(",")) if args.nfes else None
    skips = tuple(float(v) for v in args.skips.split(",")) if args.skips else None
    res = run(quick=args.quick, dim=args.dim, seed=args.seed, n_samples=args.samples, nfes=nfes, skips=skips,
              samplers=tuple(s.strip() for s in args.samplers.split(",") if s.strip()), plot=args.plot,
              verbose=args.verbose)
    print(res.table())
    if res.settings.get("plot_written"):
        print(f"plot: {args.plot}")
    return res


if __name__ == "__main__":
    main()
