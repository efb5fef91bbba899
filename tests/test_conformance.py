"""Every in-tree detector passes distkern.testing.check_method; broken detectors are caught."""
import pytest
import torch

import distkern
from distkern.testing import CheckFailure, check_method, gaussian_example

IN_TREE = ["gaussian-ad", "padim", "mahalanobis-ood", "class-center", "energy", "gmm-ood", "kde"]


@pytest.mark.parametrize("name", IN_TREE)
def test_in_tree_detectors_conform(name):
    cls = distkern.methods.get(name)
    passed = check_method(cls)
    assert "higher-is-anomalous" in passed and "save-load" in passed


class _Good:
    """A minimal correct detector: distance to the training mean."""

    name, kind, distkern_api = "toy-good", "detector", 1

    def __init__(self):
        self.mu = None

    def fit(self, x, labels=None):
        self.mu = x.mean(0)
        return self

    def score(self, x):
        if self.mu is None:
            raise RuntimeError("fit first")
        if x.dim() != 2:
            raise ValueError("x must be (N, D)")
        return (x - self.mu).norm(dim=1)

    def to(self, device):
        self.mu = self.mu.to(device)
        return self

    def save(self, path):
        from distkern.io import write_model

        write_model(path, self.name, {"mu": self.mu}, config={}, fitted={})

    @classmethod
    def load(cls, path, device="cpu"):
        from distkern.io import read_model

        _, _, t = read_model(path, cls.name)
        d = cls()
        d.mu = t["mu"]
        return d.to(device)


def test_a_good_toy_passes():
    assert len(check_method(_Good)) >= 10


def _broken(rule):
    class B(_Good):
        pass

    if rule == "declaration":
        B.distkern_api = 99
    elif rule == "score-before-fit":
        B.score = lambda self, x: torch.zeros(len(x)) if self.mu is None else _Good.score(self, x)
    elif rule == "fit-returns-self":
        B.fit = lambda self, x, labels=None: (_Good.fit(self, x), None)[1]
    elif rule == "score-shape":
        B.score = lambda self, x: _Good.score(self, x)[:, None]
    elif rule == "higher-is-anomalous":
        B.score = lambda self, x: -_Good.score(self, x)
    elif rule == "no-mutation":
        def fit(self, x, labels=None):
            x.mul_(1.0001)
            return _Good.fit(self, x)
        B.fit = fit
    elif rule == "reproducible":
        B.fit = lambda self, x, labels=None: (_Good.fit(self, x), setattr(self, "mu", self.mu + torch.rand(1)), self)[2]
    elif rule == "save-load":
        B.load = classmethod(lambda cls, path, device="cpu": (lambda d: (setattr(d, "mu", torch.zeros(8)), d)[1])(cls()))
    elif rule == "refuses-other-file":
        B.load = classmethod(lambda cls, path, device="cpu": (lambda d: (setattr(d, "mu", torch.zeros(8)), d)[1])(cls())
                             if "other" in str(path) else _Good.load.__func__(cls, path))
    elif rule == "clear-input-errors":
        B.score = lambda self, x: (x - self.mu).reshape(len(x), -1)[:, 0] * 0 + x.flatten(1)[:, 0] if x.dim() != 2 else _Good.score(self, x)
    B.name = f"toy-{rule}"
    return B


@pytest.mark.parametrize("rule", ["declaration", "score-before-fit", "fit-returns-self", "score-shape",
                                  "higher-is-anomalous", "no-mutation", "reproducible", "save-load",
                                  "refuses-other-file", "clear-input-errors"])
def test_each_rule_catches_a_broken_detector(rule):
    with pytest.raises(CheckFailure) as e:
        check_method(_broken(rule))
    assert e.value.rule == rule, str(e.value)


def test_labelled_example():
    ex = gaussian_example(torch.Generator().manual_seed(1), classes=3)
    assert ex.labels is not None and set(ex.labels.tolist()) == {0, 1, 2}


def test_cli_plugins_check(capsys):
    from distkern.cli import main

    assert main(["plugins", "--check"]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "ok (" in out
