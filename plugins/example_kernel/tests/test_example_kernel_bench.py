"""The plugin's benchmark cases (the distkern.benchmarks hook) are well-formed and agree with their baseline."""
from distkern.bench import relative_error
from distkern.bench.cases import Case

from distkern_example_kernel.bench import cases


def test_cases_agree_with_their_baseline():
    found = cases()
    assert found and all(isinstance(c, Case) for c in found)
    assert any(c.quick for c in found) and any(not c.quick for c in found)
    for c in found:
        if c.quick and "cpu" in c.devices:
            inputs = c.setup("cpu", c.dtype)
            assert relative_error(c.ours(inputs), c.baselines["eager"](inputs)) < 1e-4
