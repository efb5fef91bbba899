#!/usr/bin/env bash
# distkern GPU check: build with the CUDA kernels, run the CUDA tests, compute-sanitizer, and the
# CUDA benchmark — on a machine with an NVIDIA GPU, a CUDA build of torch, nvcc, ninja, pybind11
# and pytest already installed, and no network.
#
#   benchmarks/gpu_check.sh [OUTDIR]        (default OUTDIR: benchmarks/results/)
#
# Steps (each with its own timeout, all within a global deadline of 570 s, for a device call of 600 s;
# on the H200 of 2026-11-28 the build alone took 235 s and the CUDA tests more than 120 s on 4 workers):
#   env        nvidia-smi, versions                          -> OUTDIR/env.txt
#   build      venv /tmp/dkvenv (--system-site-packages), distkern with DISTKERN_CUDA=1, plugins/*
#                                                            -> OUTDIR/build.log
#   test       python -m pytest -m cuda                     -> OUTDIR/pytest.log
#   sanitizer  compute-sanitizer memcheck on the test_cuda_sanitizer* tests -> OUTDIR/sanitizer.log
#   bench      distkern bench --device cuda --json --time-budget (the step's time less 60 s)
#                                                           -> OUTDIR/bench.log,
#                                                              OUTDIR/bench-cuda-<gpu>-<date>.json
#              then benchmarks/cuda_graph_loop.py (a 50-step DDIM loop in one CUDA graph; its JSON is the
#              CUDA_GRAPH_LOOP line of bench.log) and benchmarks/large_kernel_sum.py (N = M = 1e6,
#              TF32 then FMA: LARGE_KERNEL_SUM lines)
#   peers      only with pykeops wheels in .whl/ (make gpu-wheels; carry .whl): KeOps on the GPU against
#              our kernel sums at N = M = 65536   -> OUTDIR/bench.log (appended),
#                                                              OUTDIR/bench-cuda-<gpu>-<date>-peers.json
#   summary    steps ok/FAILED with seconds, then the bench table -> stdout and OUTDIR/summary.txt
# Peer libraries the GPU machine lacks travel as wheels in .whl/ (`make gpu-wheels` here, then carry .whl):
# the build step installs them into the venv, except pykeops/keopscore, which the peers step installs
# after the main bench (its first use compiles KeOps' engine, which the main bench cannot wait for).
# At most 8 files are written to OUTDIR; long logs keep their head and tail.
# A missing prerequisite (nvidia-smi, a visible GPU, torch with CUDA, nvcc) stops the script at once
# with exit code 1. Otherwise every step runs; the exit code is 1 if any step failed or timed out.
#
# Environment overrides: PYTHON (python3), DK_VENV (/tmp/dkvenv), DK_DEADLINE (total seconds, 570),
# DK_T_ENV, DK_T_BUILD, DK_T_TEST, DK_T_SAN, DK_T_BENCH, DK_T_PEERS (per-step timeouts in seconds).
set -euo pipefail

START=$(date +%s)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-$REPO/benchmarks/results}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
VENV="${DK_VENV:-/tmp/dkvenv}"
DEADLINE=$((START + ${DK_DEADLINE:-570}))
T_ENV=${DK_T_ENV:-20}
T_BUILD=${DK_T_BUILD:-300}
T_TEST=${DK_T_TEST:-180}
T_SAN=${DK_T_SAN:-60}
T_BENCH=${DK_T_BENCH:-250}
T_PEERS=${DK_T_PEERS:-100}
WHEELS="$REPO/.whl"
HAVE_KEOPS_WHEELS=0
ls "$WHEELS"/pykeops-*.whl >/dev/null 2>&1 && HAVE_KEOPS_WHEELS=1

log() { printf '[gpu_check %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    printf 'gpu_check: prerequisite missing: %s\n' "$*" >>"$OUTDIR/env.txt"
    exit 1
}

# Keep a log small: its first 40 lines and last (max - 40), with a marker in between.
trim_log() {
    local f=$1 max=$2 n
    [ -f "$f" ] || return 0
    n=$(wc -l <"$f")
    if [ "$n" -gt "$max" ]; then
        { head -n 40 "$f"; echo "... [gpu_check: $((n - max)) lines cut] ..."; tail -n $((max - 40)) "$f"; } >"$f.trim"
        mv "$f.trim" "$f"
    fi
}

# ------------------------------------------------------------------------------------------------
# Prerequisites: fail fast, before anything slow.
# ------------------------------------------------------------------------------------------------
: >"$OUTDIR/env.txt"
log "repo $REPO, output in $OUTDIR"
command -v nvidia-smi >/dev/null 2>&1 ||
    die "nvidia-smi not found: no NVIDIA driver on this machine (is it a GPU machine?)"
if ! GPUS=$(timeout 20 nvidia-smi -L 2>&1); then
    die "nvidia-smi -L failed (driver not loaded or no GPU): $(echo "$GPUS" | head -n 3)"
fi
echo "$GPUS" | grep -q '^GPU ' || die "nvidia-smi lists no GPU: $(echo "$GPUS" | head -n 3)"
command -v "$PY" >/dev/null 2>&1 || die "$PY not found (set PYTHON)"
if ! TORCH_INFO=$(timeout 60 "$PY" -c '
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), sep="|")' 2>&1); then
    die "torch is not importable with $PY: $(echo "$TORCH_INFO" | tail -n 2)"
fi
TORCH_INFO=$(echo "$TORCH_INFO" | tail -n 1)
IFS='|' read -r TORCH_VER TORCH_CUDA TORCH_AVAIL <<<"$TORCH_INFO"
[ "$TORCH_CUDA" != "None" ] || die "torch $TORCH_VER is a CPU-only build (torch.version.cuda is None): install a CUDA build of torch"
[ "$TORCH_AVAIL" = "True" ] || die "torch $TORCH_VER (CUDA $TORCH_CUDA) cannot use the GPU (torch.cuda.is_available() is False; driver too old for CUDA $TORCH_CUDA?)"
NVCC=""
for c in "$(command -v nvcc 2>/dev/null || true)" "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [ -n "$c" ] && [ -x "$c" ] && [ ! -d "$c" ]; then NVCC=$c; break; fi
done
[ -n "$NVCC" ] || die "nvcc not found on PATH, in \$CUDA_HOME/bin or /usr/local/cuda/bin: install the CUDA toolkit or set CUDA_HOME"
# The toolkit directory (nvcc on PATH may be a wrapper script): the one whose headers are there.
if [ -z "${CUDA_HOME:-}" ]; then
    for d in "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV); do
        if [ -x "$d/bin/nvcc" ] && { [ -f "$d/include/cuda_runtime.h" ] ||
            [ -f "$d/targets/x86_64-linux/include/cuda_runtime.h" ] ||
            [ -f "$d/targets/sbsa-linux/include/cuda_runtime.h" ]; }; then
            export CUDA_HOME=$d
            break
        fi
    done
    [ -n "${CUDA_HOME:-}" ] || log "warning: no CUDA toolkit directory with headers found for $NVCC; set CUDA_HOME"
fi
export PATH="${CUDA_HOME:+$CUDA_HOME/bin:}$PATH"
command -v ninja >/dev/null 2>&1 || "$PY" -c 'import ninja' 2>/dev/null ||
    log "warning: ninja not found: the build falls back to slow serial compilation"

GPU_NAME=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
SLUG=$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
DATE=$(date -u +%Y%m%d)
BENCH_JSON="$OUTDIR/bench-cuda-${SLUG:-gpu}-$DATE.json"
PEERS_JSON="$OUTDIR/bench-cuda-${SLUG:-gpu}-$DATE-peers.json"
log "GPU: $GPU_NAME; torch $TORCH_VER (CUDA $TORCH_CUDA); nvcc $NVCC; CUDA_HOME ${CUDA_HOME:-unset}"

# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------
STEP_NAMES=()
STEP_STATUS=()
STEP_SECS=()
FAILED=0

# run_step NAME TIMEOUT LOG MAXLINES SCRIPT   (SCRIPT runs in a child bash, its output goes to LOG)
run_step() {
    local name=$1 t=$2 logf=$3 maxl=$4 script=$5 rc=0 t0 left status
    t0=$(date +%s)
    left=$((DEADLINE - t0))
    if [ "$left" -lt 10 ]; then
        log "$name: skipped, the global deadline is reached"
        echo "gpu_check: $name skipped: global deadline reached" >>"$logf"
        STEP_NAMES+=("$name"); STEP_STATUS+=("FAILED (no time left)"); STEP_SECS+=(0); FAILED=1
        LAST_STATUS="FAILED"
        return 0
    fi
    [ "$t" -le "$left" ] || t=$left
    log "$name: running (timeout ${t}s), log $(basename "$logf")"
    # timeout signals the whole process group: compilers, pytest and their children stop too.
    timeout --kill-after=10 "$t" bash -c "$script" >>"$logf" 2>&1 </dev/null || rc=$?
    case $rc in
        0) status="ok" ;;
        124 | 137) status="FAILED (timeout ${t}s)"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    # A step may downgrade itself to SKIP by writing 'GPU_CHECK_SKIP: reason' as its last line.
    if [ "$rc" -eq 0 ] && tail -n 1 "$logf" | grep -q '^GPU_CHECK_SKIP:'; then
        status="skipped ($(tail -n 1 "$logf" | sed 's/^GPU_CHECK_SKIP: //'))"
    fi
    echo "gpu_check: $name: $status in $(($(date +%s) - t0)) s (rc $rc)" >>"$logf"
    trim_log "$logf" "$maxl"
    STEP_NAMES+=("$name"); STEP_STATUS+=("$status"); STEP_SECS+=($(($(date +%s) - t0)))
    LAST_STATUS=$status
    log "$name: $status"
}

step_env() {
    echo "== gpu_check $(date -u +%FT%TZ) on $(hostname 2>/dev/null || echo '?')"
    echo "== repo: $REPO"
    (cd "$REPO" && git rev-parse HEAD 2>/dev/null && { git status --porcelain 2>/dev/null | head -n 20; }) ||
        echo "(no git metadata)"
    echo "== nvidia-smi"
    nvidia-smi 2>&1 | head -n 40 || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.mem,power.limit \
        --format=csv 2>&1 || true
    echo "== nvcc ($NVCC)"
    "$NVCC" --version 2>&1 | tail -n 3
    echo "== compilers"
    (gcc --version 2>&1 | head -n 1) || echo "gcc: absent" || true
    (ninja --version 2>&1) || echo "ninja: absent"
    echo "== python"
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
          "count", torch.cuda.device_count())
except Exception as e:
    print("device: error", type(e).__name__, e)
for m in ("numpy", "pybind11", "pytest", "setuptools", "ninja", "rich", "sklearn", "safetensors"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "absent", type(e).__name__)
EOF
}

step_build() {
    # (a python without ensurepip: a venv without pip, using the system's pip through the system site)
    "$PY" -m venv --clear --system-site-packages "$VENV" ||
        "$PY" -m venv --clear --without-pip --system-site-packages "$VENV"
    # --system-site-packages exposes the *base* interpreter's packages only; when $PY is itself a
    # venv (or keeps torch in its user site), hand its site directories to the new venv by a .pth
    # file, after the venv's own site-packages (so the distkern built here wins).
    local outer venv_site
    outer=$("$PY" -c 'import site, sysconfig
p = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")] + list(site.getsitepackages())
if site.ENABLE_USER_SITE: p.append(site.getusersitepackages())
print("\n".join(dict.fromkeys(p)))')
    venv_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$outer" >"$venv_site/_gpu_check_outer_site.pth"
    echo "== venv $VENV sees the site directories of $PY:"; sed 's/^/   /' "$venv_site/_gpu_check_outer_site.pth"
    "$VENV/bin/python" -c 'import torch; print("torch in venv:", torch.__version__, torch.__file__)'
    # Build from a clean copy of the tree: no stale build/ or egg-info, and the checkout is left as is.
    src=$(mktemp -d /tmp/dksrc.XXXXXX)
    trap 'rm -rf "$src"' EXIT  # (src is global in this child shell: the trap runs at its exit)
    tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./.whl \
        --exclude='./plugins/*/build' --exclude='*.egg-info' --exclude=./benchmarks/results -cf - . |
        tar -C "$src" -xf -
    cd "$src"
    # local sources into the venv: against its torch, nothing fetched
    pip_local() { "$VENV/bin/python" -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check "$@"; }
    echo "== distkern (DISTKERN_CUDA=1, from $src)"
    DISTKERN_CUDA=1 MAX_JOBS=16 pip_local .
    # the plugins in one pip call (one start-up and one install step instead of one per plugin: ~5 s of
    # 14 on 2 cores); should it fail, one call per plugin, so that the log names the one that breaks
    local p plugins=()
    for p in plugins/*/; do
        [ -f "$p/pyproject.toml" ] && plugins+=("$p")
    done
    if [ "${#plugins[@]}" -eq 0 ]; then
        echo "(no plugins under plugins/)"
    else
        echo "== plugins: ${plugins[*]}"
        if ! pip_local "${plugins[@]}"; then
            for p in "${plugins[@]}"; do
                echo "== plugin $p"
                pip_local "$p"
            done
        fi
    fi
    # carried peer wheels (diffusers, geomloss, ...): all but KeOps, which the peers step installs
    local wheels=()
    for p in "$WHEELS"/*.whl; do
        [ -f "$p" ] || continue
        case "$(basename "$p")" in pykeops-* | keopscore-*) ;; *) wheels+=("$p") ;; esac
    done
    if [ "${#wheels[@]}" -gt 0 ]; then
        echo "== carried wheels: ${wheels[*]##*/}"
        "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
            "${wheels[@]}" || echo "(carried wheels not installed: the peers they bring are not compared)"
    fi
    cd /
    "$VENV/bin/python" - <<'EOF'
import distkern
info = distkern.build_info()
print("build_info", info)
assert info.get("cuda"), "distkern was built without its CUDA kernels"
EOF
}

step_test() {
    cd "$REPO"
    # With pytest-xdist, DK_TEST_WORKERS (8) workers share the GPU, and a test that crashes its process (a
    # segfault in a kernel launch, say) costs one replaced worker instead of every test after it; with
    # pytest-timeout, a test hung for 60 s is stopped (its worker replaced) instead of eating the step.
    # Verbose lines name each test as it finishes; the PASSED / SKIPPED ones are dropped, so the log keeps
    # the name of every failure even when the step is cut before pytest's own summary.
    local extra=()
    "$VENV/bin/python" -c 'import xdist' 2>/dev/null && extra+=(-n "${DK_TEST_WORKERS:-8}" --max-worker-restart 50)
    "$VENV/bin/python" -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout 60)
    # tests/ and the plugins' own tests (the example plugin's CUDA op is tested there)
    local paths=(tests)
    for p in plugins/*/tests; do [ -d "$p" ] && paths+=("$p"); done
    "$VENV/bin/python" -m pytest -m cuda -v -rfE --tb=short -p no:cacheprovider -p no:benchmark --durations=15 "${extra[@]}" \
        "${paths[@]}" |
        { grep --line-buffered -v -E '(PASSED|SKIPPED|XFAIL)( |$)|^[^ ]+::[^ ]+ ?$' || true; }
}

step_sanitizer() {
    cd "$REPO"
    local san=""
    for c in "$(command -v compute-sanitizer 2>/dev/null || true)" "${CUDA_HOME:-}/bin/compute-sanitizer" \
        /usr/local/cuda/bin/compute-sanitizer; do
        if [ -n "$c" ] && [ -x "$c" ]; then san=$c; break; fi
    done
    if [ -z "$san" ]; then
        echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
        echo "GPU_CHECK_SKIP: compute-sanitizer missing"
        return 0
    fi
    local files
    files=$(grep -l 'def test_cuda_sanitizer' tests/test_*.py 2>/dev/null | tr '\n' ' ')
    if [ -z "$files" ]; then
        echo "GPU_CHECK_SKIP: no test_cuda_sanitizer* test in tests/"
        return 0
    fi
    local rc=0
    # No caching allocator: out-of-bounds accesses land outside torch's pooled blocks and are seen.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --error-exitcode 3 \
        "$VENV/bin/python" -m pytest -q -p no:cacheprovider $files -m cuda -k sanitizer || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "GPU_CHECK_SKIP: no CUDA test matches -k sanitizer"
        return 0
    fi
    return "$rc"
}

step_bench() {
    cd "$REPO"
    # start no case after BENCH_BUDGET s (the step's timeout less time for the scripts after it); the JSON is
    # rewritten after every case, so a timeout still leaves the finished ones
    local budget=(--time-budget "${BENCH_BUDGET:-120}")
    # the cases the issues set targets for run first, so the time budget cuts the others
    local first='^kernel_matmul/gaussian x3 N=M=65536 D=(64|512|2048) fp32( tf32)?$|_step/(16x16x256x256|1x4x128x128) fp32$'
    first+='|^anomaly_map/L=4 B=(1|8|32) P=1369 D=768 K=30 fp32$|^prompt_align/|^mahalanobis/N=1000000 D=512 '
    first+='|^mahalanobis_pos/B=32 P=3136 D=(100|550) x fp32 factors fp32$|^mahalanobis_k/|^gaussian_fit/'
    # the Gram-panel schedules (cuBLAS products) against the tile kernels they replace, on both sides of each switch
    first+='|^nearest_cosine/N=100352 M=12544 D=512 fp32| (gram|tiles)$'
    budget+=(--first "$first")
    if "$VENV/bin/python" -c 'import distkern.cli' >/dev/null 2>&1 && [ -x "$VENV/bin/distkern" ]; then
        "$VENV/bin/distkern" bench --device cuda --json "$BENCH_JSON" "${budget[@]}"
    else
        echo "(distkern.cli not importable: running python -m distkern.bench)"
        "$VENV/bin/python" -m distkern.bench --device cuda --json "$BENCH_JSON" "${budget[@]}"
    fi
    # a whole 50-step DDIM loop at SD-sized latents captured in one CUDA graph (per-step time, launches)
    echo
    "$VENV/bin/python" benchmarks/cuda_graph_loop.py --steps 50 --dtype float16 || echo "cuda_graph_loop FAILED"
    # N = M = 1e6 kernel sum (no kernel matrix could exist): TF32 tensor cores, then FMA (LARGE_KERNEL_SUM lines)
    echo "LARGE_KERNEL_SUM $("$VENV/bin/python" benchmarks/large_kernel_sum.py --mode tf32 2>&1 | tail -n 1)"
    echo "LARGE_KERNEL_SUM $("$VENV/bin/python" benchmarks/large_kernel_sum.py --mode fma --check 0 2>&1 | tail -n 1)"
}

step_peers() {
    cd "$REPO"
    "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        "$WHEELS"/keopscore-*.whl "$WHEELS"/pykeops-*.whl
    export CUDA_PATH="${CUDA_PATH:-${CUDA_HOME:-/usr/local/cuda}}"
    export KEOPS_CACHE_FOLDER=/tmp/keops-cache
    # compile KeOps' engine and one formula first, with its own limit: a KeOps that cannot build here
    # is reported as such, not as a bench failure
    if ! timeout 120 "$VENV/bin/python" -c 'import pykeops; pykeops.test_torch_bindings()'; then
        echo "GPU_CHECK_SKIP: pykeops does not run on this machine (see above)"
        return 0
    fi
    local left=$((DEADLINE - $(date +%s) - 20))
    [ "$left" -gt 20 ] || { echo "GPU_CHECK_SKIP: no time left for the KeOps cases"; return 0; }
    # the three fp32 kernel-sum cases (ours on FMAs: the float32-accurate mode, like KeOps), 3 timed calls
    "$VENV/bin/python" -m distkern bench --device cuda --cases '^kernel_matmul/gaussian x3 N=M=65536 D=[0-9]+ fp32$' \
        --repeats 3 --time-budget "$left" --json "$PEERS_JSON"
}

: >"$OUTDIR/env.txt"
echo "prerequisites: GPU $GPU_NAME; torch $TORCH_VER CUDA $TORCH_CUDA; nvcc $NVCC; CUDA_HOME ${CUDA_HOME:-unset}" >"$OUTDIR/env.txt"
for f in build.log pytest.log sanitizer.log bench.log; do : >"$OUTDIR/$f"; done
rm -f "$OUTDIR/pytest-junit.xml" "$PEERS_JSON"

# The steps run in child shells: hand them the functions and the settings.
export -f step_env step_build step_test step_sanitizer step_bench step_peers
export REPO OUTDIR PY VENV NVCC BENCH_JSON PEERS_JSON WHEELS DEADLINE
LAST_STATUS=""

run_step env "$T_ENV" "$OUTDIR/env.txt" 200 "set -uo pipefail; step_env"
run_step build "$T_BUILD" "$OUTDIR/build.log" 300 "set -euo pipefail; step_build"
if [ "$LAST_STATUS" = "ok" ]; then
    export PATH="$VENV/bin:$PATH"
    run_step test "$T_TEST" "$OUTDIR/pytest.log" 600 "set -euo pipefail; step_test"
    run_step sanitizer "$T_SAN" "$OUTDIR/sanitizer.log" 200 "set -euo pipefail; step_sanitizer"
    left=$((DEADLINE - $(date +%s)))
    bt=$T_BENCH
    [ "$bt" -le "$left" ] || bt=$left
    # with KeOps wheels, the peers step gets its T_PEERS s out of what the bench would take
    [ "$HAVE_KEOPS_WHEELS" = 0 ] || [ $((left - bt)) -ge "$T_PEERS" ] || bt=$((left - T_PEERS))
    [ "$bt" -ge 30 ] || bt=30
    export BENCH_BUDGET=$((bt > 90 ? bt - 60 : bt / 2))
    run_step bench "$bt" "$OUTDIR/bench.log" 400 "set -euo pipefail; step_bench"
    if [ "$HAVE_KEOPS_WHEELS" = 1 ]; then
        echo "== peers: KeOps on the GPU" >>"$OUTDIR/bench.log"
        run_step peers "$T_PEERS" "$OUTDIR/bench.log" 500 "set -euo pipefail; step_peers"
    fi
else
    for s in test:pytest sanitizer:sanitizer bench:bench; do
        echo "gpu_check: ${s%%:*} not run: the build failed (see build.log)" >>"$OUTDIR/${s#*:}.log"
        STEP_NAMES+=("${s%%:*}"); STEP_STATUS+=("FAILED (build failed)"); STEP_SECS+=(0)
    done
    FAILED=1
fi

# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------
{
    echo "== gpu_check summary: $GPU_NAME, torch $TORCH_VER (CUDA $TORCH_CUDA), $(date -u +%FT%TZ), total $(($(date +%s) - START)) s"
    printf '%-10s %-32s %6s\n' step status seconds
    for i in "${!STEP_NAMES[@]}"; do
        printf '%-10s %-32s %6s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_SECS[$i]}"
    done
    if [ -s "$OUTDIR/bench.log" ] && grep -q '^distkern bench —' "$OUTDIR/bench.log"; then
        echo
        sed -n '/^distkern bench —/,$p' "$OUTDIR/bench.log" | grep -v '^gpu_check: '
    fi
    [ -f "$BENCH_JSON" ] && echo "bench JSON: $BENCH_JSON"
    [ -f "$PEERS_JSON" ] && echo "peers JSON: $PEERS_JSON"
    if [ "$FAILED" = 0 ]; then echo "gpu_check: all steps ok"; else echo "gpu_check: FAILED (see the logs in $OUTDIR)"; fi
} | tee "$OUTDIR/summary.txt"
exit "$FAILED"
