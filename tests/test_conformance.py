"""distkern.testing.check_method: every in-tree plugin of every kind passes it, and it catches a deliberately
broken method for each rule of each kind."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import distkern
from distkern.testing import RULES, CheckFailure, SamplerExample, check_method, gaussian_example

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The in-tree plugins: whatever plugins/*/pyproject.toml declare and the registry finds installed
# ---------------------------------------------------------------------------------------------


def _declared() -> dict[str, str]:
    """Method name -> distribution, from the distkern.methods entry points of plugins/*/pyproject.toml."""
    out = {}
    for toml in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        text = toml.read_text()
        dist = re.search(r'^name\s*=\s*"([^"]+)"', text, flags=re.M)
        section = re.search(r'^\[project\.entry-points\."distkern\.methods"\]\n(.*?)(?=^\[|\Z)', text,
                            flags=re.M | re.S)
        if dist and section:
            for name in re.findall(r'^\s*"?([A-Za-z0-9_.-]+)"?\s*=', section.group(1), flags=re.M):
                out[name] = dist.group(1)
    return out


def _in_tree_params():
    installed = {m.name: m.package for m in distkern.methods.available()}
    params = []
    for name, dist in sorted(_declared().items()):
        if installed.get(name) == dist:
            params.append(name)
        else:
            params.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{dist} is not installed")))
    return params


_KEY_RULES = {"detector": {"higher-is-anomalous", "save-load"}, "loss": {"scalar", "differentiable"},
              "sampler": {"step-output", "reproducible"}, "aligner": {"output-shapes", "differentiable"}}


def test_the_in_tree_plugins_are_found():
    declared = _declared()
    assert {"gaussian-ad", "padim", "diag-gaussian", "mmd-align"} <= set(declared)


@pytest.mark.parametrize("name", _in_tree_params())
def test_in_tree_methods_conform(name):
    cls = distkern.methods.get(name)  # a broken or incompatible plugin fails here, with its error
    passed = check_method(cls)
    assert _KEY_RULES[cls.kind] <= set(passed), passed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", _in_tree_params())
def test_in_tree_detectors_refuse_an_unusable_device(name):
    """to("cuda") — and so load(path, device="cuda") — on a machine without CUDA is a ValueError naming the
    method, not torch's bare AssertionError from deep inside a tensor move."""
    cls = distkern.methods.get(name)
    if cls.kind != "detector":
        pytest.skip("a detector's to(device)")
    factory = getattr(cls, "example_instance", None)  # as check_method makes one
    det = factory() if callable(factory) else cls()
    with pytest.raises(ValueError, match=f"{name}: cannot use device 'cuda'.*CUDA is not available"):
        det.to("cuda")
    with pytest.raises(ValueError, match=f"{name}: 'gpu0' is not a device"):
        det.to("gpu0")
    assert det.to("cpu") is det


# ---------------------------------------------------------------------------------------------
# Detectors
# ---------------------------------------------------------------------------------------------


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
    assert check_method(_Good()) == check_method(_Good)  # an (unfitted) instance is checked through copies


def _broken(rule):
    class B(_Good):
        pass

    if rule == "declaration":
        B.distkern_api = 99
    elif rule == "construct":
        B.__init__ = lambda self, needed: _Good.__init__(self)
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
        # randomness that torch.manual_seed does not reach (the check seeds torch before each fit)
        B.fit = lambda self, x, labels=None: (_Good.fit(self, x), setattr(self, "mu", self.mu + _unseeded()), self)[2]
    elif rule == "save-load":
        B.load = classmethod(lambda cls, path, device="cpu": (lambda d: (setattr(d, "mu", torch.zeros(8)), d)[1])(cls()))
    elif rule == "refuses-other-file":
        B.load = classmethod(lambda cls, path, device="cpu": (lambda d: (setattr(d, "mu", torch.zeros(8)), d)[1])(cls())
                             if "other" in str(path) else _Good.load.__func__(cls, path))
    elif rule == "clear-input-errors":
        B.score = lambda self, x: (x - self.mu).reshape(len(x), -1)[:, 0] * 0 + x.flatten(1)[:, 0] if x.dim() != 2 else _Good.score(self, x)
    elif rule == "other-dtypes":  # float32 parameters multiplied by the features: "expected both ... same dtype"
        B.score = lambda self, x: _Good.score(self, x) + (x @ torch.zeros(x.shape[1], dtype=torch.float32)) * 0
    B.name = f"toy-{rule}"
    return B


_DETECTOR_RULES = [r for r in RULES["detector"] if r != "device"] + ["construct"]


@pytest.mark.parametrize("rule", _DETECTOR_RULES)
def test_each_rule_catches_a_broken_detector(rule):
    with pytest.raises(CheckFailure) as e:
        check_method(_broken(rule))
    assert e.value.rule == rule, str(e.value)


@pytest.mark.parametrize("missing", ["score", "save", "load", "fit"])
def test_a_detector_missing_a_method_fails_declaration(missing):
    B = type("NoMethod", (_Good,), {missing: None})
    with pytest.raises(CheckFailure) as e:
        check_method(B)
    assert e.value.rule == "declaration" and missing in str(e.value)


def test_save_load_calls_load_with_a_device():
    """distkern score calls load(path, device=...): a load without device= fails save-load, not later."""
    class NoDevice(_Good):
        @classmethod
        def load(cls, path):
            return _Good.load.__func__(cls, path)

    with pytest.raises(CheckFailure) as e:
        check_method(NoDevice)
    assert e.value.rule == "save-load" and "device" in str(e.value)


def test_reproducible_seeds_torch_before_each_fit():
    """A fit drawing from torch's global generator (a random subsample) is reproducible under the check."""
    class Subsample(_Good):
        def fit(self, x, labels=None):
            return _Good.fit(self, x[torch.randperm(len(x))[: max(2, len(x) // 2)]])

    assert "reproducible" in check_method(Subsample)


def test_a_detector_may_refuse_other_dtypes_with_type_error():
    class Float32Only(_Good):
        name = "toy-float32-only"

        def score(self, x):
            if x.dtype != torch.float32:
                raise TypeError(f"toy: features must be float32; got {x.dtype}")
            return _Good.score(self, x)

    passed = check_method(Float32Only)
    assert "other-dtypes" not in passed and "clear-input-errors" in passed


def _variant(**attrs):
    class V(_Good):
        pass

    for k, v in attrs.items():
        setattr(V, k, v)
    V.name = "toy-variant"
    return V


@pytest.mark.parametrize("attrs,rule,match", [
    # a save() that pickles passes a round trip through its own load(), but distkern score cannot read it
    (dict(save=lambda self, path: torch.save({"mu": self.mu}, path),
          load=classmethod(lambda cls, path, device="cpu": (lambda d: (setattr(d, "mu", torch.load(path)["mu"]), d)[1])(cls()))),
     "save-load", "distkern's model format"),
    (dict(save=lambda self, path: __import__("distkern").io.write_model(path, "someone-else", {"mu": self.mu},
                                                                         config={}, fitted={})),
     "save-load", "recorded the method 'someone-else'"),
    (dict(load=classmethod(lambda cls, path, device="cpu": 1 / 0)), "save-load", "ZeroDivisionError"),
    (dict(score=lambda self, x: _Good.score(self, x).double()), "score-shape", "must be float32"),
    (dict(score=lambda self, x: _Good.score(self, x) * float("nan")), "score-shape", "inf/NaN"),
])
def test_detector_subchecks_name_the_problem(attrs, rule, match):
    with pytest.raises(CheckFailure, match=match) as e:
        check_method(_variant(**attrs))
    assert e.value.rule == rule


def test_labelled_example():
    ex = gaussian_example(torch.Generator().manual_seed(1), classes=3)
    assert ex.labels is not None and set(ex.labels.tolist()) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


class _GoodLoss(torch.nn.Module):
    """Squared distance between the batch means."""

    name, kind, distkern_api = "toy-loss", "loss", 1

    def forward(self, x, y):
        if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
            raise ValueError(f"toy-loss: x and y must be (n, D), (m, D); got {tuple(x.shape)}, {tuple(y.shape)}")
        return (x.mean(0) - y.mean(0)).square().sum()


def _unseeded(shape=(1,)):
    g = torch.Generator()
    g.seed()
    return torch.rand(shape, generator=g)


def _broken_loss(rule):
    good = _GoodLoss.forward
    body = {
        "scalar": lambda self, x, y: (x.mean(0) - y.mean(0)).square(),
        "finite": lambda self, x, y: good(self, x, y) + float("inf"),
        "no-mutation": lambda self, x, y: good(self, x.add_(1.0), y),
        "differentiable": lambda self, x, y: good(self, x, y).detach(),
        "reproducible": lambda self, x, y: good(self, x, y) + _unseeded()[0],
        "clear-input-errors": lambda self, x, y: (x.mean(0) - y.mean(0)).square().sum(),
    }
    if rule == "is-module":
        class B:
            name, kind, distkern_api = "toy-loss-plain", "loss", 1

            def __call__(self, x, y):
                return good(None, x, y)
        return B
    if rule == "construct":
        class B(_GoodLoss):
            def __init__(self, needed):
                super().__init__()
        return B
    return type("B", (_GoodLoss,), {"forward": body[rule], "name": f"toy-loss-{rule}"})


def test_a_good_loss_passes():
    assert check_method(_GoodLoss) == [r for r in RULES["loss"] if r != "device" or torch.cuda.is_available()]


@pytest.mark.parametrize("rule", [r for r in RULES["loss"] if r not in ("declaration", "device")] + ["construct"])
def test_each_rule_catches_a_broken_loss(rule):
    with pytest.raises(CheckFailure) as e:
        check_method(_broken_loss(rule))
    assert e.value.rule == rule, str(e.value)


def test_loss_hooks_inputs_instance_and_differentiable_inputs():
    class Weighted(_GoodLoss):
        name = "toy-loss-hooks"
        differentiable_inputs = (0,)  # the targets are constants here

        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        @classmethod
        def example_instance(cls):
            return cls(2.0)

        @staticmethod
        def example_data(gen):
            return torch.randn(10, 3, generator=gen), torch.randn(12, 3, generator=gen)

        def forward(self, x, y):
            return self.weight * super().forward(x, y.detach())

    assert "differentiable" in check_method(Weighted)
    assert "differentiable" in check_method(Weighted(3.0))


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


class _GoodSampler:
    """Deterministic DDIM on a linear β schedule, in plain torch."""

    name, kind, distkern_api = "toy-sampler", "sampler", 1

    def __init__(self, num_train_timesteps: int = 100):
        self.n_train = num_train_timesteps
        self.ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64), 0)
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    @property
    def config(self):
        return {"num_train_timesteps": self.n_train}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def set_timesteps(self, n, device=None):
        self.num_inference_steps = n
        self.timesteps = (torch.arange(n - 1, -1, -1) * (self.n_train // n)).to(device)

    def _update(self, eps, t, x):
        t = int(t)
        prev = t - self.n_train // self.num_inference_steps
        a, ap = float(self.ac[t]), (float(self.ac[prev]) if prev >= 0 else 1.0)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        return ap ** 0.5 * x0 + (1 - ap) ** 0.5 * eps

    def step(self, model_output, timestep, sample):
        if self.num_inference_steps is None:
            raise ValueError("toy-sampler: call set_timesteps first")
        return SimpleNamespace(prev_sample=self._update(model_output, timestep, sample))


def _broken_sampler(rule):
    class B(_GoodSampler):
        pass

    good_step, good_set = _GoodSampler.step, _GoodSampler.set_timesteps
    if rule == "construct":
        B.__init__ = lambda self, needed: _GoodSampler.__init__(self)
    elif rule == "step-before-set-timesteps":
        def step(self, m, t, x):
            self.num_inference_steps = self.num_inference_steps or 10
            return good_step(self, m, t, x)
        B.step = step
    elif rule == "set-timesteps":
        B.set_timesteps = lambda self, n, device=None: (good_set(self, n, device),
                                                        setattr(self, "timesteps", torch.zeros(n, 2)))[0]
    elif rule == "step-output":
        B.step = lambda self, m, t, x: SimpleNamespace(prev_sample=good_step(self, m, t, x).prev_sample.double())
    elif rule == "no-mutation":
        B.step = lambda self, m, t, x: good_step(self, m.clamp_(-0.01, 0.01), t, x)
    elif rule == "loop-finite":
        B.step = lambda self, m, t, x: SimpleNamespace(prev_sample=good_step(self, m, t, x).prev_sample * 1e30)
    elif rule == "reproducible":
        B.step = lambda self, m, t, x: SimpleNamespace(prev_sample=good_step(self, m, t, x).prev_sample
                                                       + 0.1 * _unseeded(x.shape))
    elif rule == "config-round-trip":
        B.from_config = classmethod(lambda cls, config: cls(config["num_train_timesteps"] // 2))
    elif rule == "other-dtypes":  # computes in float32 whatever the sample's dtype
        B.step = lambda self, m, t, x: SimpleNamespace(prev_sample=good_step(self, m.float(), t, x.float()).prev_sample)
    B.name = f"toy-sampler-{rule}"
    return B


def test_a_good_sampler_passes():
    assert check_method(_GoodSampler) == [r for r in RULES["sampler"] if r != "device" or torch.cuda.is_available()]
    ex = SamplerExample(torch.randn(3, 5), num_inference_steps=4, model=lambda x, t: 0.1 * x)
    assert "loop-finite" in check_method(_GoodSampler(50), example=ex)


@pytest.mark.parametrize("rule", [r for r in RULES["sampler"] if r not in ("declaration", "device")] + ["construct"])
def test_each_rule_catches_a_broken_sampler(rule):
    with pytest.raises(CheckFailure) as e:
        check_method(_broken_sampler(rule))
    assert e.value.rule == rule, str(e.value)


def test_a_sampler_without_config_skips_the_round_trip():
    class NoConfig(_GoodSampler):
        name = "toy-sampler-no-config"
        config = None

    assert "config-round-trip" not in check_method(NoConfig)


# ---------------------------------------------------------------------------------------------
# Aligners
# ---------------------------------------------------------------------------------------------


class _GoodAligner(torch.nn.Module):
    """Cosine similarity to (normal, abnormal) prompts, temperature softmax; a learnable temperature."""

    name, kind, distkern_api = "toy-aligner", "aligner", 1

    def __init__(self):
        super().__init__()
        self.log_t = torch.nn.Parameter(torch.tensor(-2.0) + 0.01 * torch.randn(()))

    def forward(self, tokens, prompts):
        if tokens.dim() != 3 or prompts.dim() != 2 or prompts.shape[1] != tokens.shape[2]:
            raise ValueError(f"toy-aligner: need tokens (B, P, D) and prompts (2, D); got {tuple(tokens.shape)}, "
                             f"{tuple(prompts.shape)}")
        sim = F.normalize(tokens, dim=-1) @ F.normalize(prompts, dim=-1).T
        maps = (sim / self.log_t.exp()).softmax(-1)[..., 1]
        return maps, maps.amax(1)


def _broken_aligner(rule):
    good = _GoodAligner.forward
    body = {
        "output-shapes": lambda self, t, p: (good(self, t, p)[0], good(self, t, p)[1][:, None]),
        "finite": lambda self, t, p: tuple(v / 0 for v in good(self, t, p)),
        "no-mutation": lambda self, t, p: good(self, t.mul_(2.0), p),
        "differentiable": lambda self, t, p: tuple(v.detach() for v in good(self, t, p)),
        "reproducible": lambda self, t, p: tuple(v + _unseeded() for v in good(self, t, p)),
        "clear-input-errors": lambda self, t, p: (lambda m: (m, m.amax(-1)))(
            (F.normalize(t, dim=-1) @ F.normalize(p[..., :t.shape[-1]], dim=-1).T).softmax(-1)[..., 1]),
    }
    if rule == "is-module":
        class B:
            name, kind, distkern_api = "toy-aligner-plain", "aligner", 1

            def __call__(self, t, p):
                return good(_GoodAligner(), t, p)
        return B
    if rule == "construct":
        class B(_GoodAligner):
            def __init__(self, needed):
                super().__init__()
        return B
    return type("B", (_GoodAligner,), {"forward": body[rule], "name": f"toy-aligner-{rule}"})


def test_a_good_aligner_passes():
    assert check_method(_GoodAligner) == [r for r in RULES["aligner"] if r != "device" or torch.cuda.is_available()]


@pytest.mark.parametrize("rule", [r for r in RULES["aligner"] if r not in ("declaration", "device")] + ["construct"])
def test_each_rule_catches_a_broken_aligner(rule):
    with pytest.raises(CheckFailure) as e:
        check_method(_broken_aligner(rule))
    assert e.value.rule == rule, str(e.value)


# ---------------------------------------------------------------------------------------------
# distkern plugins --check: every installed method, every kind, a table; failures exit 1
# ---------------------------------------------------------------------------------------------


def test_cli_plugins_check(capsys):
    from distkern.cli import main

    toys = [_GoodLoss, _GoodSampler, _GoodAligner, _broken_loss("finite")]
    for cls in toys:
        distkern.methods.register(cls)
    try:
        rc = main(["plugins", "--check", "--json"])
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert main(["plugins", "--check"]) == rc
        table = capsys.readouterr().out
    finally:
        for cls in toys:
            distkern.methods.unregister(cls.name)
    for name in ("toy-loss", "toy-sampler", "toy-aligner"):
        assert rows[name]["check"].startswith("ok ("), rows[name]
    assert rows["toy-loss-finite"]["check"].startswith("FAILED [finite]")
    assert rc == 1  # the broken toy
    for r in rows.values():  # a method that cannot load fails the check too
        assert r["check"] == f"FAILED [{r['status']}]" if r["status"] != "ok" else r["check"].startswith(("ok (", "FAILED"))
    assert re.search(r"^name\s+kind\s+package\s+version\s+status\s+error\s+check", table, flags=re.M)
    assert re.search(r"^toy-sampler\s+sampler\s+<in-process>.*ok \(\d+ rules(; device not run: no GPU)?\)", table, flags=re.M)


def test_cli_plugins_check_fails_on_a_method_that_cannot_load(capsys, monkeypatch):
    from distkern import cli

    rows = [{"name": "ghost", "kind": "detector", "package": "ghost-pkg", "version": "1", "status": "broken",
             "error": "ImportError: no module"}]
    monkeypatch.setattr(cli, "_plugin_rows", lambda: [dict(r) for r in rows])
    assert cli.main(["plugins"]) == 0  # listing is not checking
    assert cli.main(["plugins", "--check"]) == 1
    assert "FAILED [broken]" in capsys.readouterr().out


def test_aligner_with_layered_tokens_passes():
    # an aligner over several layers' tokens (L, B, P, D), as Bayes-PFL, is checked without a workaround
    class LayeredAligner(torch.nn.Module):
        name, kind, distkern_api = "layered-aligner", "aligner", distkern.methods.API_VERSION

        def __init__(self):
            super().__init__()
            self.tau = torch.nn.Parameter(torch.tensor(5.0))

        @staticmethod
        def example_data(gen):
            return (torch.randn(3, 2, 16, 8, generator=gen), torch.randn(2, 8, generator=gen))

        def forward(self, tokens, prompts):
            if tokens.dim() != 4 or prompts.shape != (2, tokens.shape[-1]):
                raise ValueError(f"layered-aligner: tokens (L, B, P, D) and prompts (2, D); got {tuple(tokens.shape)} "
                                 f"and {tuple(prompts.shape)}")
            sim = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(prompts, dim=-1).T
            maps = (self.tau * sim).softmax(-1)[..., 1].mean(0)
            return maps, maps.amax(1)

    passed = check_method(LayeredAligner)
    assert "output-shapes" in passed and "differentiable" in passed
