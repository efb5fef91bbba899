"""The ``distkern`` command: ``info``, ``plugins`` and ``bench``.

Exit codes: 0 success, 1 failure (one line on stderr; a traceback with ``--debug`` or
``DISTKERN_DEBUG=1``), 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Sequence

import torch

__all__ = ["main"]

_COLUMNS = ("name", "kind", "package", "version", "status", "error")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _registered_ops() -> list[str]:
    import torch

    try:
        names = torch._C._dispatch_get_all_op_names()
    except Exception:  # noqa: BLE001  private API: fall back to nothing rather than fail
        return []
    return sorted(n for n in names if n.startswith("distkern::"))


def _plugin_rows() -> list[dict[str, Any]]:
    from . import methods

    return [m.to_dict() for m in methods.available()]


def _info() -> dict[str, Any]:
    import torch

    import distkern
    from distkern.ops._cpu import product_kernel_name, vector_cpu_math

    kernel, lanes = product_kernel_name(), vector_cpu_math()
    if kernel:
        products = f"distkern {kernel}"
    elif lanes == "AVX2":  # AVX2+FMA without AVX-512, DISTKERN_CPU_GEMM not 0: csrc/common/cpu_gemm.cpp
        products = "torch BLAS; distkern AVX2 for PaDiM's triangular products and mmd2's Gram"
    else:
        products = "torch BLAS"
    devices: list[dict[str, Any]] = [{"type": "cpu", "name": _cpu_name(),
                                      "threads": torch.get_num_threads(),
                                      "float32 products": products,
                                      "exp / sigmoid lanes": lanes or "scalar"}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append({"type": "cuda", "index": i, "name": torch.cuda.get_device_name(i),
                            "capability": f"{major}.{minor}"})
    return {
        "version": distkern.__version__,
        "build": distkern.build_info(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "devices": devices,
        "ops": _registered_ops(),
        "plugins": _plugin_rows(),
    }


def _first_line(text: Any) -> str:
    if text is None:
        return ""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        from .methods import ENTRY_POINT_GROUP

        print(f"no methods registered (entry-point group {ENTRY_POINT_GROUP!r})")
        return
    columns = _COLUMNS + (("check",) if any("check" in r for r in rows) else ())
    cells = [[_first_line(r.get(c)) if c in ("error", "check") else str(r.get(c) or "") for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # noqa: N806
    if Console is None or not sys.stdout.isatty():  # plain aligned text for pipes
        for row in [list(columns), *cells]:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        return
    console, table = Console(), Table()
    room = max(12, console.width - sum(w for c, w in zip(columns, widths) if c != "error") - 3 * len(columns) - 1)
    for c, w in zip(columns, widths):  # the error column gives way (full text: --json)
        table.add_column(c, no_wrap=True, overflow="ellipsis", max_width=room if c == "error" else w)
    styles = {"ok": "green", "collision": "yellow"}
    for row in cells:
        table.add_row(*row, style=styles.get(row[4], "red"))
    console.print(table)


def _cmd_info(args: argparse.Namespace) -> int:
    info = _info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"distkern {info['version']}  (torch {info['torch']}, python {info['python']})")
    print("build:")
    for key, value in info["build"].items():
        print(f"  {key:16} {value}")
    print("devices:")
    for d in info["devices"]:
        extra = (f"  ({d['threads']} threads; float32 products: {d['float32 products']};"
                 f" exp / sigmoid lanes: {d['exp / sigmoid lanes']})" if d["type"] == "cpu"
                 else f"  (sm_{d['capability']})")
        label = "cpu" if d["type"] == "cpu" else f"cuda:{d['index']}"
        print(f"  {label:8} {d['name']}{extra}")
    print(f"ops ({len(info['ops'])}):")
    for op in info["ops"]:
        print(f"  {op}")
    print("plugins:")
    _print_table(info["plugins"])
    return 0


def _check_rows(rows: list[dict[str, Any]]) -> int:
    """Run distkern.testing.check_method on every loadable method (all kinds); add a 'check' column."""
    from . import methods
    from .testing import CheckFailure, check_method

    failed = 0
    for r in rows:
        if r.get("status") != "ok":  # a plugin that cannot load (broken, incompatible, collision) fails --check
            r["check"], failed = f"FAILED [{r.get('status')}]", failed + 1
            continue
        try:
            passed = check_method(methods.get(r["name"]))
            r["check"] = f"ok ({len(passed)} rules{'' if 'device' in passed else '; device not run: no GPU'})"
        except CheckFailure as e:
            r["check"], failed = f"FAILED {e}", failed + 1
        except Exception as e:  # noqa: BLE001 - a crashing method is a failed check, not a crashed CLI
            r["check"], failed = f"FAILED [crash] {type(e).__name__}: {e}", failed + 1
    return failed


def _cmd_plugins(args: argparse.Namespace) -> int:
    rows = _plugin_rows()
    if args.names:
        known = {r["name"] for r in rows}
        unknown = [n for n in args.names if n not in known]
        if unknown:
            raise ValueError(f"no distkern method named {unknown[0]!r}; installed: {', '.join(sorted(known))}")
        rows = [r for r in rows if r["name"] in args.names]
    failed = _check_rows(rows) if args.check else 0
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        _print_table(rows)
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        from . import bench
    except ImportError as e:
        if _debug(args):
            raise
        print(f"distkern: error: the benchmark harness is not available ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 1
    run = getattr(bench, "main", None)
    if run is None:
        print("distkern: error: the benchmark harness is not available (distkern.bench has no main)",
              file=sys.stderr)
        return 1
    return int(run(list(args.bench_args)) or 0)


def _cmd_fit(args: argparse.Namespace) -> int:
    from . import methods
    from .io import load_features, load_labels, parse_options

    cls = methods.get(args.method)
    kind = getattr(cls, "kind", None)
    if kind != "detector":
        raise ValueError(f"{args.method} is a {kind or 'method of no kind'}; distkern fit / score take detectors "
                         "(distkern plugins lists the kinds)")
    _check_output_dir(args.output)  # before fitting, not after
    if not str(args.output).endswith(".safetensors"):
        raise ValueError(f"-o {args.output}: the model is written as safetensors; name the file *.safetensors")
    features, labels = load_features(args.features)
    if args.labels:
        labels = load_labels(args.labels)
    options = parse_options(args.set or [])
    try:
        det = cls(**options)
    except TypeError as e:  # an unknown --set key: name the ones the method takes
        import inspect

        try:
            params = [n for n, p in inspect.signature(cls).parameters.items()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            params = []
        unknown = [k for k in options if params and k not in params]
        if not unknown:
            raise
        raise ValueError(f"--set {unknown[0]}=...: {args.method} takes no option {unknown[0]!r}; its options: "
                         f"{', '.join(params) or 'none'}") from e
    det.fit(features, labels) if labels is not None else det.fit(features)
    det.save(args.output)
    shown = repr(det)
    if shown.startswith("<") and " object at 0x" in shown:  # no __repr__ of its own: the address says nothing
        shown = type(det).__name__
    print(f"fitted {args.method} on {args.features} -> {args.output}: {shown}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from .io import check_device, load_features, load_labels, load_model
    from .metrics import auroc, average_precision, binary_labels

    check_device(args.device, "--device")
    if args.output:
        _check_output_dir(args.output)
    det = load_model(args.model, device=args.device)
    if not callable(getattr(det, "score", None)):
        kind = getattr(det, "kind", None)
        if kind == "detector":
            raise ValueError(f"{args.model} holds the detector {det.name!r}, whose class "
                             f"{type(det).__name__} has no callable score() (distkern plugins --check tells why)")
        raise ValueError(f"{args.model} holds a {kind or type(det).__name__} "
                         f"({det.name}); distkern score takes detectors")
    if args.map:  # before any work
        if not hasattr(det, "anomaly_map"):
            raise ValueError(f"--map: method {det.name!r} has no anomaly map (try padim)")
        _pyplot()
    features, labels = load_features(args.features)
    if args.labels:
        labels = load_labels(args.labels)
    n = len(features[0]) if isinstance(features, list) else len(features)
    if labels is not None:  # before scoring: class labels (they are for fit) are refused by the metrics anyway
        binary_labels(labels, "score")
        if len(labels) != n:
            raise ValueError(f"--labels: {len(labels)} labels for {n} samples in {args.features}")
    if args.device != "cpu":
        features = [f.to(args.device) for f in features] if isinstance(features, list) else features.to(args.device)
    scores = det.score(features).detach().float().cpu()
    if tuple(scores.shape) != (n,):  # the contract: one score per sample (distkern plugins --check tests it)
        raise ValueError(f"{det.name}: score() returned shape {tuple(scores.shape)} for {n} samples; a detector "
                         f"returns ({n},)")
    finite = scores[torch.isfinite(scores)]
    q = torch.quantile(finite, torch.tensor([0.0, 0.5, 1.0])) if finite.numel() else None
    n_bad = scores.numel() - finite.numel()
    print(f"{args.model} ({det.name}) on {args.features}: {scores.numel()} scores"
          + (f", min {q[0]:.4g} median {q[1]:.4g} max {q[2]:.4g}" if q is not None else "")
          + (f", {n_bad} not finite (inf/NaN features?)" if n_bad else ""))
    if labels is not None:
        print(f"AUROC {auroc(scores, labels):.4f}  AUPR {average_precision(scores, labels):.4f}")
    if args.output:
        out = args.output if args.output.endswith(".npy") else args.output + ".npy"  # what np.save writes
        np.save(out, scores.numpy())
        print(f"scores written to {out}")
    if args.map:
        maps = det.anomaly_map(features).detach().float().cpu()
        _save_map_png(maps, args.map)
        print(f"anomaly maps written to {args.map}")
    return 0


def _check_output_dir(path: str) -> None:
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"-o {path}: no such directory {out_dir!r}")


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or a clear error (checked before scoring, so none is wasted)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--map needs matplotlib: pip install matplotlib (or distkern's plot extra)") from None
    return plt


def _save_map_png(maps: torch.Tensor, path: str, columns: int = 8) -> None:
    """A grid of the (N, H, W) maps, one colour scale for all, as a PNG (matplotlib needed)."""
    plt = _pyplot()
    n = maps.shape[0]
    if n == 0:
        raise ValueError("--map: no images to draw (the features hold 0 samples)")
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    finite = maps[torch.isfinite(maps)]  # one scale for all maps, from their finite values (NaN pixels blank)
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(maps[i].numpy(), vmin=vmin, vmax=vmax, cmap="inferno")
            ax.set_title(str(i), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cmd_new_plugin(args: argparse.Namespace) -> int:
    from .scaffold import new_plugin

    root = new_plugin(args.name, args.kind, args.output, with_kernel=args.with_kernel, op=args.op)
    iso = "--no-build-isolation " if (root / "setup.py").exists() else ""  # a kernel plugin builds against torch
    print(f"wrote {root}: pip install {iso}-e {root} && pytest {root / 'tests'}")
    return 0


def _debug(args: argparse.Namespace | None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("DISTKERN_DEBUG", "") not in ("", "0")


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="distkern",
        description="Fused C++/CUDA kernels for learned-distribution methods.",
        epilog="Set DISTKERN_DEBUG=1 (or pass --debug) to see tracebacks.")
    parser.add_argument("--version", action="version", version=f"distkern {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")

    p = sub.add_parser("info", parents=[common], help="build, device, op and plugin information",
                       description="Show how distkern was built, the torch it runs with, the "
                                   "devices, the registered torch ops and the plugin table.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("plugins", parents=[common], help="list the method plugins and their status",
                       description="List every method of the 'distkern.methods' registry with its "
                                   "kind, package, version and status (ok, broken, incompatible, "
                                   "collision).")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--check", action="store_true",
                   help="run distkern.testing.check_method on every installed method, of every kind "
                        "(exit 1 if one fails, or if a method cannot load: broken, incompatible, collision)")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these methods (default: all)")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("fit", parents=[common], help="fit a method to features and save it",
                       description="Fit METHOD (a registered detector, see 'distkern plugins') to the "
                                   "features in FEATURES (.npy, .pt or .safetensors) and save the model.")
    p.add_argument("method", help="method name, e.g. gaussian-ad")
    p.add_argument("features", help="feature file (.npy, .pt, .safetensors); may also hold 'labels'")
    p.add_argument("-o", "--output", required=True, help="model file to write (.safetensors)")
    p.add_argument("--labels", help="labels file, for methods that use them (e.g. class labels)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="constructor option of the method (repeatable), e.g. --set estimator=oas")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("score", parents=[common], help="score features with a saved model",
                       description="Score FEATURES with MODEL; with labels (0 normal, 1 anomalous) "
                                   "print AUROC and AUPR.")
    p.add_argument("model", help="model file written by 'distkern fit' or a method's save()")
    p.add_argument("features", help="feature file (.npy, .pt, .safetensors); may also hold 'labels'")
    p.add_argument("--labels", help="labels file: 0 normal, 1 anomalous")
    p.add_argument("-o", "--output", help="write the scores to this .npy file")
    p.add_argument("--map", help="write the anomaly maps to this PNG (methods with anomaly maps, e.g. padim)")
    p.add_argument("--device", default="cpu", help="device to score on (default cpu)")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("new-plugin", parents=[common], help="write a plugin package to start from",
                       description="Write a working plugin package NAME/ (pyproject with the entry point, "
                                   "the method class, tests that pass as generated, a README); with "
                                   "--with-kernel also a C++/CUDA op in its own torch-library namespace, "
                                   "built by a setup.py that uses distkern.cpp_extension.")
    p.add_argument("name", help="method name, e.g. my-detector")
    p.add_argument("--kind", required=True, choices=["detector", "loss", "sampler", "aligner"],
                   help="kind of method")
    p.add_argument("--with-kernel", action="store_true",
                   help="add a C++ op with CPU and CUDA kernels (torch library distkern_<name>)")
    p.add_argument("--op", metavar="OP", default=None,
                   help="name of that op (a lowercase identifier, e.g. my_score; default standardized_sqdist); "
                        "implies --with-kernel")
    p.add_argument("-o", "--output", default=".", help="folder to write the package into (default: .)")
    p.set_defaults(func=_cmd_new_plugin)

    p = sub.add_parser("bench", help="run the microbenchmarks (arguments go to the harness)",
                       description="Run the microbenchmark harness; every argument after "
                                   "'bench' is passed to it (try 'distkern bench --help').",
                       add_help=False)
    p.set_defaults(func=_cmd_bench, bench_args=[])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``distkern`` command line; returns the exit code."""
    parser = _parser()
    args: argparse.Namespace | None = None
    try:
        args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
        if args.command == "bench":
            args.bench_args = extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args))
    except SystemExit as e:  # argparse: --help / --version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("distkern: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `distkern bench --list | head`: the reader has gone, as for any Unix tool
        try:  # stdout's buffer would fail again at exit: point it at /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except Exception as e:  # noqa: BLE001
        if _debug(args):
            raise
        print(f"distkern: error: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return 1
