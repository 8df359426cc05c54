"""FID with the in-project shapes feature net (callbacks/fid.py, datamodules/shapes/features.py)."""



import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from callbacks.fid import ImageDistances, distance_scores, fid_score, make_fid, to_uint8_nchw
from datamodules.shapes.features import DEFAULT_PATH, TRAIN_COMMAND, evaluate, load_feature_net, render_dataset
from datamodules.shapes.world import ShapesWorld

N = 512  # images per set; FID's finite-sample bias shrinks with N, so all compared sets share it


def _renders(world: ShapesWorld, start: int, n: int = N) -> np.ndarray:
    """uint8 [n, 32, 32, 3] held-out ("test" split) renders."""
    return np.stack([world.sample("test", i).image for i in range(start, start + n)])


def _blur(images: np.ndarray, sigma: float) -> torch.Tensor:
    """Gaussian blur of uint8 [N,H,W,3] -> uint8 [N,3,H,W]."""
    x = to_uint8_nchw(images).float()
    r = int(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).repeat(3, 1)  # [3, 2r+1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(F.conv2d(x, k[:, None, :, None], groups=3), k[:, None, None, :], groups=3)
    return x.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def sets():
    world = ShapesWorld(0)
    a, b = _renders(world, 0), _renders(world, N)
    counting_only = _renders(ShapesWorld(0, families=("counting",)), 0)  # 2-4 objects of one shape
    return {"a": a, "b": b, "counting_only": counting_only}


@pytest.fixture(scope="module")
def scores(sets):
    a = sets["a"]
    return {
        "self": fid_score(a, a),
        "same": fid_score(a, sets["b"]),
        "blur": fid_score(a, _blur(sets["b"], 2.0)),
        "vflip": fid_score(a, sets["b"][:, ::-1].copy()),  # upside-down triangles, mirrored layout
        "counts": fid_score(a, sets["counting_only"]),
    }


def test_fid_self_is_zero(scores):
    assert abs(scores["self"]) < 1e-3 * min(scores["blur"], scores["counts"])
    assert abs(scores["self"]) < 1e-4


def test_fid_separates_same_from_shifted_distributions(scores):
    same = scores["same"]
    assert 0 < same
    # A different object-count distribution, flipped scenes and heavy blur must stand far above
    # sampling noise (same-distribution FID at N=512 is mostly finite-sample bias).
    assert scores["counts"] > 5 * same, scores
    assert scores["vflip"] > 4 * same, scores
    assert scores["blur"] > 3 * same, scores


def test_fid_score_input_layouts_agree(sets):
    a, b = sets["a"][:64], sets["b"][:64]
    ref = fid_score(a, b)
    assert fid_score(torch.from_numpy(a).permute(0, 3, 1, 2), b) == pytest.approx(ref, rel=1e-6)
    assert fid_score(a.astype(np.float32) / 255, b) == pytest.approx(ref, rel=1e-6)


def test_make_fid_keeps_real_statistics_across_reset(sets):
    a, b = to_uint8_nchw(sets["a"][:128]), to_uint8_nchw(sets["b"][:128])
    fid = make_fid()
    fid.update(a, real=True)
    fid.update(b, real=False)
    first = fid.compute()
    fid.reset()  # a callback resets between evaluations: only fake features are re-accumulated
    fid.update(b, real=False)
    assert torch.allclose(fid.compute(), first)


def test_kid_beside_fid_separates_distributions_at_small_n(sets):
    # KID is unbiased: near 0 for the same distribution at n = 64 (within its spread), far above for a shifted one.
    a, b, counts = sets["a"], sets["b"][:64], sets["counting_only"][:64]
    same, shifted = distance_scores(a, b), distance_scores(a, counts)
    assert set(same) == {"fid", "kid", "kid_std", "fid_n", "fid_real_n"}
    assert (same["fid_n"], same["fid_real_n"]) == (64, N)
    assert abs(same["kid"]) < 2 * same["kid_std"] + 1e-6, same
    assert shifted["kid"] > same["kid"] + 5 * max(same["kid_std"], 1e-6), (same, shifted)
    assert shifted["fid"] > same["fid"]
    # FID agrees with fid_score, and equal inputs give equal KIDs (its subsets come from a fixed seed).
    assert same["fid"] == pytest.approx(fid_score(a, b), rel=1e-5)
    assert distance_scores(a, b) == same


def test_kid_leaves_the_global_rng_alone(sets):
    metric = ImageDistances(kid_subsets=3)
    metric.update(to_uint8_nchw(sets["a"][:16]), real=True)
    metric.update(to_uint8_nchw(sets["b"][:8]), real=False)
    state = torch.get_rng_state()
    metric.compute()
    assert torch.equal(torch.get_rng_state(), state)  # a training run's random stream does not depend on evaluation


def test_image_distances_keep_real_set_across_reset_and_fit_subsets_to_n(sets):
    metric = ImageDistances(kid_subsets=5)
    metric.update(to_uint8_nchw(sets["a"][:32]), real=True)
    metric.update(to_uint8_nchw(sets["b"][:8]), real=False)
    first = metric.compute()
    assert metric.kid.subset_size == 8 and first["fid_n"] == 8  # KID refuses subsets larger than a set
    metric.reset()
    metric.update(to_uint8_nchw(sets["b"][:8]), real=False)
    assert metric.compute() == first and metric.num_real == 32
    metric.reset()
    metric.update(to_uint8_nchw(sets["b"][:1]), real=False)
    with pytest.raises(ValueError, match=">= 2"):
        metric.compute()


def test_shipped_feature_net_accuracy():
    net = load_feature_net()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    net.train()  # e.g. Lightning's model.train(): BatchNorm statistics must stay frozen
    assert not net.training
    n_params = sum(p.numel() for p in net.parameters())
    assert 50_000 <= n_params <= 160_000
    x, counts, occ = render_dataset(ShapesWorld(0), "test", 512, start=5000)
    metrics = evaluate(net, x, counts, occ)
    assert metrics["scene_counts"] >= 0.9, metrics  # all 18 (shape, color) counts of an image right
    assert metrics["total_count"] >= 0.95, metrics
    assert metrics["occupancy"] >= 0.98, metrics  # per cell of the 6 colors x 4x4 grid
    assert metrics["occupancy_iou"] >= 0.8, metrics  # most cells are empty: also check the occupied ones


def test_feature_net_input_handling():
    net = load_feature_net()
    x = render_dataset(ShapesWorld(0), "test", 8)[0]
    feats = net(x)
    assert feats.shape == (8, net.num_features)
    assert torch.allclose(net(x.float() / 255), feats, atol=1e-5)  # float [0,1] == uint8
    big = F.interpolate(x.float(), size=(299, 299), mode="nearest").to(torch.uint8)  # torchmetrics' probe size
    assert net(big).shape == (8, net.num_features)
    assert net.embed(x).shape == (8, net.config["embed_dim"])


def test_missing_feature_net_path_raises(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt") as err:
        load_feature_net(missing)
    assert TRAIN_COMMAND in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        make_fid("shapes", feature_net_path=missing)
    assert DEFAULT_PATH.is_file()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_make_fid_inception_needs_local_weights(no_network, tmp_path):
    with pytest.raises(ValueError, match="local file.*nothing is downloaded"):
        make_fid("inception")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        make_fid("inception", inception_weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="feature must be one of"):
        make_fid("clip")


def test_make_fid_inception_without_torch_fidelity_says_how_to_install(no_network, tmp_path):
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed")
    except ImportError:
        pass
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"")
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        make_fid("inception", inception_weights=weights)
