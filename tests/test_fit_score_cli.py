"""distkern fit / distkern score, the feature-file readers and the ranking metrics."""
import sys

import numpy as np
import pytest
import torch

from distkern import io as dkio
from distkern.cli import main
from distkern.metrics import auroc, average_precision


def test_metrics_match_sklearn(rng):
    skm = pytest.importorskip("sklearn.metrics")
    for n in (10, 257, 2000):
        y = torch.randint(0, 2, (n,), generator=rng)
        y[0], y[1] = 0, 1
        s = torch.randn(n, generator=rng) + y
        s[::7] = s[3]  # ties
        assert auroc(s, y) == pytest.approx(skm.roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
        assert average_precision(s, y) == pytest.approx(skm.average_precision_score(y.numpy(), s.numpy()), abs=1e-12)
    with pytest.raises(ValueError, match="both normal"):
        auroc(torch.ones(3), torch.ones(3))


def test_feature_files(tmp_path, rng):
    from safetensors.torch import save_file

    x = torch.randn(6, 3, generator=rng)
    np.save(tmp_path / "f.npy", x.numpy())
    torch.save({"features": x, "labels": torch.arange(6)}, tmp_path / "f.pt")
    save_file({"features.0": x, "features.1": x[:, :2].contiguous(), "labels": torch.arange(6)}, str(tmp_path / "f.safetensors"))
    f, y = dkio.load_features(tmp_path / "f.npy")
    assert torch.equal(f, x) and y is None
    f, y = dkio.load_features(tmp_path / "f.pt")
    assert torch.equal(f, x) and torch.equal(y, torch.arange(6))
    f, y = dkio.load_features(tmp_path / "f.safetensors")
    assert isinstance(f, list) and len(f) == 2 and torch.equal(f[1], x[:, :2])
    (tmp_path / "f.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unknown feature file type"):
        dkio.load_features(tmp_path / "f.csv")
    with pytest.raises(FileNotFoundError):
        dkio.load_features(tmp_path / "missing.npy")


def test_fit_then_score_prints_auroc(tmp_path, rng, capsys):
    train = torch.randn(500, 6, generator=rng)
    test = torch.cat([torch.randn(100, 6, generator=rng), torch.randn(100, 6, generator=rng) * 3])
    labels = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    np.save(tmp_path / "train.npy", train.numpy())
    torch.save({"features": test, "labels": labels}, tmp_path / "test.pt")
    model = tmp_path / "m.safetensors"
    assert main(["fit", "gaussian-ad", str(tmp_path / "train.npy"), "-o", str(model), "--set", "estimator=oas"]) == 0
    assert main(["score", str(model), str(tmp_path / "test.pt"), "-o", str(tmp_path / "s.npy")]) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "AUPR" in out
    auc = float(out.split("AUROC")[1].split()[0])
    assert auc > 0.9
    scores = np.load(tmp_path / "s.npy")
    assert scores.shape == (200,)
    assert dkio.model_method(model) == "gaussian-ad"
    assert dkio.load_model(model).estimator == "oas"
    if not torch.cuda.is_available():  # a device this machine lacks: named, before any work
        assert main(["score", str(model), str(tmp_path / "test.pt"), "--device", "cuda"]) == 1
        assert "--device: cannot use device 'cuda': CUDA is not available" in capsys.readouterr().err
        with pytest.raises(ValueError, match="gaussian-ad: cannot use device 'cuda:1'"):
            dkio.load_model(model, device="cuda:1")


def test_fit_score_errors(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((3, 2), dtype=np.float32))
    assert main(["fit", "no-such-method", str(tmp_path / "x.npy"), "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "no-such-method" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "x.npy"), str(tmp_path / "x.npy")]) == 1
    assert "not a safetensors model" in capsys.readouterr().err
    assert main(["fit", "gaussian-ad"]) == 2


def test_model_file_format(tmp_path):
    p = tmp_path / "m.safetensors"
    dkio.write_model(p, "my-method", {"w": torch.arange(4.0)}, config={"a": 1}, fitted={"n": 3}, format_version=2)
    config, fitted, tensors = dkio.read_model(p, "my-method", format_version=2, package="my-pkg")
    assert config == {"a": 1} and fitted == {"n": 3} and torch.equal(tensors["w"], torch.arange(4.0))
    with pytest.raises(ValueError, match="holds a my-method model, not a other model"):
        dkio.read_model(p, "other")
    with pytest.raises(ValueError, match="format version 2, newer than this plugin reads \\(1\\); upgrade my-pkg"):
        dkio.read_model(p, "my-method", format_version=1, package="my-pkg")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dkio.read_model(tmp_path / "junk.safetensors", "my-method")
    with pytest.raises(FileNotFoundError):
        dkio.read_model(tmp_path / "missing.safetensors", "my-method")


def test_cli_labels_kinds_and_maps(tmp_path, rng, capsys):
    """Labels files holding a dict, refusal of class labels for AUROC and of non-detectors, --map checked
    before scoring and drawn from the finite values."""
    train = torch.randn(200, 4, generator=rng)
    test = torch.randn(20, 4, generator=rng)
    np.save(tmp_path / "train.npy", train.numpy())
    np.save(tmp_path / "test.npy", test.numpy())
    torch.save({"labels": (torch.arange(20) % 2)}, tmp_path / "y.pt")
    torch.save({"labels": (torch.arange(20) % 3)}, tmp_path / "classes.pt")
    model = tmp_path / "m.safetensors"
    assert main(["fit", "gaussian-ad", str(tmp_path / "train.npy"), "-o", str(model)]) == 0
    assert main(["score", str(model), str(tmp_path / "test.npy"), "--labels", str(tmp_path / "y.pt")]) == 0
    assert "AUROC" in capsys.readouterr().out
    assert main(["score", str(model), str(tmp_path / "test.npy"), "--labels", str(tmp_path / "classes.pt")]) == 1
    assert "0 (normal) or 1 (anomalous)" in capsys.readouterr().err
    assert main(["fit", "mmd-align", str(tmp_path / "train.npy"), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "take detectors" in capsys.readouterr().err
    assert main(["score", str(model), str(tmp_path / "test.npy"), "--map", str(tmp_path / "m.png"),
                 "-o", str(tmp_path / "s.npy")]) == 1
    assert "no anomaly map" in capsys.readouterr().err and not (tmp_path / "s.npy").exists()
    torch.save({"labels": torch.arange(7) % 2}, tmp_path / "short.pt")
    assert main(["score", str(model), str(tmp_path / "test.npy"), "--labels", str(tmp_path / "short.pt"),
                 "-o", str(tmp_path / "s.npy")]) == 1
    err = capsys.readouterr()
    assert "7 labels for 20 samples" in err.err and "scores" not in err.out and not (tmp_path / "s.npy").exists()


@pytest.mark.parametrize("method", ["gaussian-ad", "kde", "diag-gaussian"])
def test_one_class_fit_refuses_anomalous_labels(method, tmp_path, rng, capsys):
    """A feature file whose labels mark anomalies (a test file given to fit by mistake) is refused by the
    one-class detectors with the rows to drop, not fitted; all-zero labels are accepted."""
    if method == "diag-gaussian":
        pytest.importorskip("distkern_example_kernel")
    x = torch.randn(30, 4, generator=rng)
    torch.save({"features": x, "labels": (torch.arange(30) >= 25).long()}, tmp_path / "mixed.pt")
    torch.save({"features": x, "labels": torch.zeros(30, dtype=torch.long)}, tmp_path / "normal.pt")
    out = tmp_path / "m.safetensors"
    assert main(["fit", method, str(tmp_path / "mixed.pt"), "-o", str(out)]) == 1
    assert "non-zero at rows [25, 26, 27, 28, 29]" in capsys.readouterr().err and not out.exists()
    assert main(["fit", method, str(tmp_path / "normal.pt"), "-o", str(out)]) == 0 and out.exists()
    with pytest.raises(ValueError, match="3 labels for 30 samples"):
        dkio.normal_only(torch.zeros(3), method, 30)


def test_cli_map_without_matplotlib_is_refused_before_scoring(tmp_path, rng, capsys, monkeypatch):
    """`score --map` on a machine without matplotlib says so before any scoring, output or summary."""
    pytest.importorskip("distkern_padim")
    feats = torch.randn(6, 4, 3, 3, generator=rng)
    torch.save(feats, tmp_path / "train.pt")
    model = tmp_path / "p.safetensors"
    assert main(["fit", "padim", str(tmp_path / "train.pt"), "-o", str(model), "--set", "num_features=3"]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["score", str(model), str(tmp_path / "train.pt"), "--map", str(tmp_path / "m.png"),
                 "-o", str(tmp_path / "s.npy")]) == 1
    out = capsys.readouterr()
    assert "--map needs matplotlib" in out.err and "scores" not in out.out and not (tmp_path / "s.npy").exists()


def test_map_png_ignores_nan_pixels(tmp_path):
    pytest.importorskip("matplotlib")
    from distkern.cli import _save_map_png

    maps = torch.rand(2, 8, 8)
    maps[1, 3, 3] = float("nan")
    _save_map_png(maps, str(tmp_path / "m.png"))
    import matplotlib.image as mpimg

    img = mpimg.imread(tmp_path / "m.png")
    assert (img[..., :3] < 0.9).any(axis=-1).mean() > 0.2  # maps drawn (a NaN scale left them blank)
    with pytest.raises(ValueError, match="no images"):
        _save_map_png(maps[:0], str(tmp_path / "e.png"))


def test_unreadable_files_are_named(tmp_path, capsys):
    for name in ("g.npy", "g.pt", "g.safetensors"):
        (tmp_path / name).write_bytes(b"garbage" * 8)
        with pytest.raises(ValueError, match=f"{name}: not a readable"):
            dkio.load_features(tmp_path / name)
    np.save(tmp_path / "be.npy", np.arange(6, dtype=">f4").reshape(3, 2))  # big-endian: converted, not refused
    assert torch.equal(dkio.load_features(tmp_path / "be.npy")[0], torch.arange(6.0).reshape(3, 2))
    np.save(tmp_path / "train.npy", np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32))
    assert main(["fit", "gaussian-ad", str(tmp_path / "train.npy"), "-o", str(tmp_path / "no" / "m.safetensors")]) == 1
    assert "no such directory" in capsys.readouterr().err
    nan = np.full((4, 3), np.nan, dtype=np.float32)
    np.save(tmp_path / "nan.npy", nan)
    assert main(["fit", "gaussian-ad", str(tmp_path / "train.npy"), "-o", str(tmp_path / "m.safetensors")]) == 0
    assert main(["score", str(tmp_path / "m.safetensors"), str(tmp_path / "nan.npy"), "-o", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "4 not finite" in out and (tmp_path / "s.npy").exists() and "s.npy" in out


def test_fit_and_score_name_what_is_wrong(tmp_path, rng, capsys):
    np.save(tmp_path / "train.npy", torch.randn(200, 4, generator=rng).numpy())
    train = str(tmp_path / "train.npy")
    assert main(["fit", "gaussian-ad", train, "-o", str(tmp_path / "m.safetensors"), "--set", "bogus=1"]) == 1
    err = capsys.readouterr().err
    assert "takes no option 'bogus'" in err and "estimator" in err  # the valid keys are listed
    assert main(["fit", "gaussian-ad", train, "-o", str(tmp_path / "m.npy")]) == 1
    assert "name the file *.safetensors" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "nope.safetensors"), train]) == 1
    assert "no such model file" in capsys.readouterr().err
