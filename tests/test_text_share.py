"""``text_share``: the same fraction of text positions for latent patches and for VQ codes, counted in packed
training batches; the solved fraction of text-only documents; unreachable shares fail clearly."""

import pytest

from datamodules.shapes import ShapesDataModule
from datamodules.shapes.transfusion import text_ratio_for_share
from tests.conftest import ROOT

CODES = dict(image_tokens="codes", vq_path=str(ROOT / "datamodules/shapes/pretrained_vq"), patch_size=1, seq_len=256,
             batch_size=8)


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """Small datamodules sharing one cache, each set up once."""
    cache, built = tmp_path_factory.mktemp("cache"), {}

    def build(**settings) -> ShapesDataModule:
        key = tuple(sorted(settings.items()))
        if key not in built:
            built[key] = ShapesDataModule(data_dir=str(cache), num_train=48, num_val=8, val_rows=2, cond_gap_pairs=4,
                                          scene_caption_ratio=0.9, **settings)
            built[key].setup("fit")
        return built[key]

    return build


@pytest.fixture(scope="module")
def target(make) -> float:
    """The text share the latent default (text_ratio 0.25) realizes."""
    return round(make().expected_text_share, 2)


def realized_text_share(dm: ShapesDataModule, rows: int = 1024) -> float:
    """Text positions over all non-pad positions of the first ``rows`` rows of training batches."""
    text = image = 0
    for _, batch in zip(range(rows // dm.hparams.batch_size), dm.train_dataloader(), strict=False):
        real = batch.seq.doc_ids >= 0
        if dm.codes:
            is_image = batch.seq.tokens >= dm.special_ids["first_code"]
        else:
            is_image = batch.seq.image_ids >= 0
        text += int((real & ~is_image).sum())
        image += int((real & is_image).sum())
    return text / (text + image)


def test_default_keeps_text_ratio(make):
    dm = make()
    assert dm.text_ratio_effective == 0.25
    assert 0.5 < dm.expected_text_share < 0.75  # latents: ~62 % text, ~38 % patches


@pytest.mark.parametrize("settings", [{}, CODES], ids=["latents", "codes"])
def test_realized_share_matches_the_target(make, target, settings):
    dm = make(text_share=target, **settings)
    assert dm.expected_text_share == pytest.approx(target, abs=0.01)
    assert realized_text_share(dm) == pytest.approx(target, abs=0.03)


def test_codes_need_more_text_documents(make, target):
    latents, codes = make(text_share=target), make(text_share=target, **CODES)
    # The latent default's own share gives back (about) its text_ratio ...
    assert latents.text_ratio_effective == pytest.approx(0.25, abs=0.03)
    # ... and 64 codes per image instead of 16 patches take many more text-only documents for the same share.
    assert codes.text_ratio_effective > latents.text_ratio_effective + 0.25
    # Without text_share the codes see far less text: the ~1.9x gap this setting closes.
    assert make(**CODES).expected_text_share < target - 0.2


def test_linear_solution_by_hand():
    text, caption, image = 40.0, 16.0, 64.0
    for share in (0.25, 0.5, 0.62, 0.9, 1.0):
        r = text_ratio_for_share(share, text, caption, image)
        assert 0 <= r <= 1
        assert (r * text + (1 - r) * caption) / (r * text + (1 - r) * (caption + image)) == pytest.approx(share)
    with pytest.raises(ValueError, match="below 0.2000"):
        text_ratio_for_share(0.1, text, caption, image)


def test_unreachable_and_conflicting_settings_fail_clearly(make):
    unreachable = r"text_share={} cannot be reached: the reachable range is \[0\.[{}]\d\d, 1\]"
    with pytest.raises(ValueError, match=unreachable.format(0.1, "12")):
        make(text_share=0.1, **CODES)  # captions: ~16 text positions per 64 codes
    with pytest.raises(ValueError, match=unreachable.format(0.4, "45")):
        make(text_share=0.4)  # ~16 per 16 patches
    with pytest.raises(ValueError, match="text_share=0"):
        ShapesDataModule(text_share=0.0)
    with pytest.raises(ValueError, match="text_share=0.6 and data.text_ratio=0.5"):
        ShapesDataModule(text_share=0.6, text_ratio=0.5)
