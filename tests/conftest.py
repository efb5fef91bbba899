import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A fresh, unseeded generator per test: inputs differ from run to run (the op must be right on any input).
    Its seed is printed with a failure, and ``DISTKERN_TEST_SEED=<seed>`` replays it."""
    import os

    g = torch.Generator()
    seed = os.environ.get("DISTKERN_TEST_SEED")
    if seed is not None:
        g.manual_seed(int(seed))
    else:
        g.seed()
    request.node.user_properties.append(("rng_seed", g.initial_seed()))
    return g


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "rng_seed":
                report.sections.append(("rng", f"rng seed {value}: rerun with DISTKERN_TEST_SEED={value}"))


@pytest.fixture
def gloo_run(tmp_path):
    """Run a script as two torch.distributed ranks on the gloo backend (loopback only).

    ``gloo_run(script, *args)`` writes ``script`` to a file and starts it twice with argv
    ``[rank, port, *args]``; fails the test if a rank fails or both do not finish in 120 s."""
    import os
    import socket
    import subprocess
    import sys

    def run(script: str, *args: str) -> list[str]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        path = tmp_path / "gloo_worker.py"
        path.write_text(script)
        env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, str(path), str(r), str(port), *args], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=120)[0].decode())
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail("gloo workers timed out")
        assert all(p.returncode == 0 for p in procs), "\n".join(logs)
        return logs

    return run


@pytest.fixture
def with_and_without_avx512(tmp_path):
    """Run a snippet three times in fresh interpreters — distkern's CPU code as it chooses itself (AVX-512
    where the CPU has it), DISTKERN_CPU_GEMM=avx2 (the AVX2 micro-kernel for every product, the scalar φ) and
    DISTKERN_CPU_GEMM=0 (torch's BLAS and the scalar φ) — and return what each saved, in that order.

    ``with_and_without_avx512(code)``: ``code`` saves its result with ``torch.save(obj, sys.argv[1])``.
    On a CPU without AVX2 the runs take the fallback and agree trivially."""
    import os
    import subprocess
    import sys

    def run(code: str) -> list:
        outs = []
        for flag in ("1", "avx2", "0"):
            path = tmp_path / f"result_{flag}.pt"
            subprocess.run([sys.executable, "-c", code, str(path)], check=True,
                           env=dict(os.environ, DISTKERN_CPU_GEMM=flag), timeout=120)
            outs.append(torch.load(path))
        return outs

    return run
