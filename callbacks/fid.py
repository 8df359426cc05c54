"""FID and KID for the shapes world: torchmetrics' FrechetInceptionDistance and KernelInceptionDistance over a
choice of feature nets (`ImageDistances` computes both through one net).

* "shapes" (default): the in-project `ShapesFeatureNet` (datamodules/shapes/features.py), trained
  to read counts/colors/shapes/layout off 32x32 renders; ships with the repo, CPU-cheap (512 vs
  512 images in < 1 s). Its FID features are the top 32 PCs of a 128-d embedding, which keeps
  the finite-sample bias low: at 512 vs 512 renders, same distribution ~27, a different
  object-count distribution ~162, vertically flipped scenes ~134, Gaussian blur sigma=2 px ~119.
* "inception": the standard FID Inception-v3 (torchmetrics' `NoTrainInceptionV3`, which needs
  `torch-fidelity`). Its weights must already be on disk and are passed as a path; nothing here
  ever downloads (torch-fidelity would fetch them from the internet when given no path).

Images everywhere: uint8 [N, 3, H, W] (0..255). `fid_score` also accepts channels-last arrays and
float images in [0, 1].
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

FEATURES = ("shapes", "inception")
INCEPTION_WEIGHTS_HINT = (
    "FID-Inception needs the FID Inception-v3 weights from a local file (nothing is downloaded): pass "
    "inception_weights='/path/to/weights-inception-2015-12-05-6726825d.pth' (torch-fidelity's file; "
    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth holds the same weights), or use feature='shapes'"
)


def feature_net(feature: str = "shapes", inception_weights: str | os.PathLike | None = None,
                feature_net_path: str | os.PathLike | None = None) -> torch.nn.Module:
    """The feature network FID and KID share: uint8 [N, 3, H, W] -> [N, num_features] (see `make_fid`).

    Raises ValueError / FileNotFoundError / ModuleNotFoundError with instructions; never downloads.
    """
    if feature == "shapes":
        from datamodules.shapes.features import load_feature_net  # lazy: keeps import of this module cheap

        return load_feature_net(feature_net_path)
    if feature == "inception":
        if inception_weights is None:
            raise ValueError(f"make_fid('inception') got no inception_weights. {INCEPTION_WEIGHTS_HINT}.")
        path = Path(inception_weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {path}. {INCEPTION_WEIGHTS_HINT}.")
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModuleNotFoundError("make_fid('inception') needs torch-fidelity for the FID Inception network: "
                                      "`pip install torch-fidelity` (or use feature='shapes').")
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(path))
        # Passing the built module (with num_features) rather than feature=2048 keeps the weights path explicit.
        net.num_features = 2048
        return net
    raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")


def make_fid(
    feature: str = "shapes",
    inception_weights: str | os.PathLike | None = None,
    feature_net_path: str | os.PathLike | None = None,
    reset_real_features: bool = False,
    **metric_kwargs,
) -> FrechetInceptionDistance:
    """A FrechetInceptionDistance to be fed uint8 images [N, 3, H, W] via `update(imgs, real=...)`.

    feature: "shapes" (ShapesFeatureNet from `feature_net_path`, default the shipped weights; any
        H, W, resized to 32x32 inside) or "inception" (2048-d pool features; needs
        `inception_weights`, a local file, and torch-fidelity).
    reset_real_features: False by default so real-image statistics are computed once and survive
        `reset()` between evaluations (only fake features are re-accumulated).
    Raises ValueError / FileNotFoundError / ModuleNotFoundError with instructions; never downloads.
    """
    net = feature_net(feature, inception_weights, feature_net_path)
    # normalize=False: the metric passes images through untouched and both nets accept uint8.
    return FrechetInceptionDistance(feature=net, normalize=False, reset_real_features=reset_real_features,
                                    **metric_kwargs)


class ImageDistances(torch.nn.Module):
    """FID and KID of one fake set against one real set, through one feature network (`feature_net`).

    KID (torchmetrics' `KernelInceptionDistance`, cubic polynomial kernel) is an unbiased estimator, so unlike
    FID its expected value does not drift with n; it stands beside FID where n is small. Each of its `kid_subsets`
    subsets draws `min(n_real, n_fake, kid_subset_size)` images of each set; `kid_std` is the spread over subsets
    (0 when both sets are used whole). The subsets are drawn from a fixed seed (`kid_seed`), so equal inputs give
    equal scores and the global RNG is left alone.

    Real features survive `reset()` (only the fake set is re-accumulated), as in `make_fid`.
    """

    def __init__(self, feature: str = "shapes", inception_weights: str | os.PathLike | None = None,
                 feature_net_path: str | os.PathLike | None = None, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, kid_seed: int = 0, **metric_kwargs):
        super().__init__()
        net = feature_net(feature, inception_weights, feature_net_path)
        self.fid = FrechetInceptionDistance(feature=net, normalize=False, reset_real_features=False, **metric_kwargs)
        with warnings.catch_warnings():  # "will save all extracted features": that is how KID works
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            self.kid = KernelInceptionDistance(feature=net, normalize=False, reset_real_features=False,
                                               subsets=kid_subsets, subset_size=kid_subset_size, **metric_kwargs)
        self.kid_subset_size, self.kid_seed = kid_subset_size, kid_seed

    def update(self, images: Tensor, real: bool) -> None:
        """Add uint8 images [N, 3, H, W] to the real or the fake set."""
        self.fid.update(images, real=real)
        self.kid.update(images, real=real)

    def reset(self) -> None:
        """Forget the fake set (the real set is kept)."""
        self.fid.reset()
        self.kid.reset()

    @property
    def num_real(self) -> int:
        return int(self.fid.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        return int(self.fid.fake_features_num_samples)

    def compute(self) -> dict[str, float]:
        """{"fid", "kid", "kid_std", "fid_n" (fake images), "fid_real_n" (real images)}; needs >= 2 of each."""
        n_real, n_fake = self.num_real, self.num_fake
        if min(n_real, n_fake) < 2:
            raise ValueError(f"FID/KID need >= 2 real and >= 2 fake images, got {n_real} and {n_fake}")
        # KID refuses subsets larger than a set; at small n it uses the whole fake set (unbiased either way).
        self.kid.subset_size = min(n_real, n_fake, self.kid_subset_size)
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets with torch.randperm
            torch.manual_seed(self.kid_seed)
            kid, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid), "kid_std": float(kid_std),
                "fid_n": float(n_fake), "fid_real_n": float(n_real)}


def to_uint8_nchw(images) -> Tensor:
    """uint8/float, [N,H,W,3] or [N,3,H,W], tensor or array -> uint8 tensor [N,3,H,W].

    Floats are taken to be in [0, 1]. Channels-last is detected by a last dim of 3 with a
    second dim that is not 3 (so 3x3 images would be ambiguous; they never occur here).
    """
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    if x.dim() != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"expected images [N,H,W,3] or [N,3,H,W], got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.contiguous()


@torch.no_grad()
def fid_score(real, fake, feature: str = "shapes", batch_size: int = 256,
              device: str | torch.device = "cpu", **make_fid_kwargs) -> float:
    """FID between two image sets (each uint8/float, [N,H,W,3] or [N,3,H,W], N >= 2) -> float.

    Lower is better; ~0 for identical sets. Values depend on N (finite-sample bias), so compare
    scores computed with equal set sizes.
    """
    metric = make_fid(feature, **make_fid_kwargs).to(device)
    for images, is_real in ((to_uint8_nchw(real), True), (to_uint8_nchw(fake), False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i : i + batch_size].to(device), real=is_real)
    return float(metric.compute())


@torch.no_grad()
def distance_scores(real, fake, feature: str = "shapes", batch_size: int = 256,
                    device: str | torch.device = "cpu", **kwargs) -> dict[str, float]:
    """`ImageDistances.compute` of two image sets (as for `fid_score`): fid, kid, kid_std, fid_n, fid_real_n."""
    metric = ImageDistances(feature, **kwargs).to(device)
    for images, is_real in ((to_uint8_nchw(real), True), (to_uint8_nchw(fake), False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i : i + batch_size].to(device), real=is_real)
    return metric.compute()
