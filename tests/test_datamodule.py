"""The shapes datamodule: packed rows, document mix, caption/image layouts, cond-gap pairs, caching."""

import numpy as np
import pytest
import torch

from datamodules.shapes import ShapesDataModule
from lit_transfusion.batch import IGNORE, Image


@pytest.fixture(scope="module")
def dm(tmp_path_factory):
    d = ShapesDataModule(data_dir=str(tmp_path_factory.mktemp("cache")), num_train=96, num_val=48,
                         cond_gap_pairs=32, val_rows=4, batch_size=4)
    d.prepare_data()
    d.setup("fit")
    return d


def test_linked_values(dm):
    assert dm.latent_shape == (4, 8, 8)
    assert dm.vocab_size > 256 and set(dm.special_ids) == {"pad", "bos", "eos", "boi", "eoi"}
    assert dm.latents["train"].shape == (96, 4, 8, 8)
    # standardized latents (the VAE's shift/scale): roughly zero mean, unit std
    assert abs(dm.latents["train"].mean()) < 0.25 and 0.7 < dm.latents["train"].std() < 1.3


def test_rows_are_deterministic_and_full(dm):
    ds = dm.train_dataloader().dataset
    a, b = dm._collate_rows([ds[3], ds[4]]), dm._collate_rows([ds[3], ds[4]])
    assert torch.equal(a.seq.tokens, b.seq.tokens) and torch.equal(a.latents, b.latents)
    fill = torch.stack([(dm._collate_rows([ds[i]]).seq.doc_ids >= 0).float().mean() for i in range(40)])
    assert fill.mean() > 0.8, f"rows should be mostly full, got {fill.mean():.2f}"


def test_document_mix_matches_ratios(dm):
    rng = np.random.default_rng(0)
    kinds = {"text": 0, "caption_first": 0, "image_first": 0, "null_caption": 0}
    for _ in range(300):
        for doc in dm.random_row("train", rng):
            if len(doc) == 1:
                kinds["text"] += 1
            elif isinstance(doc[1], Image) and doc[1].t_max == dm.hparams.noise_limit:
                kinds["image_first"] += 1
                assert doc[0].ids == [dm.tokenizer.special.bos] and len(doc[2].ids) > 1
            elif not doc[0].loss:
                kinds["null_caption"] += 1
                assert doc[0].ids == [dm.tokenizer.special.bos] and doc[2].ids == [dm.tokenizer.special.eos]
            else:
                kinds["caption_first"] += 1
                assert len(doc[0].ids) > 1 and doc[1].t_max == 1000
    n_img = kinds["caption_first"] + kinds["image_first"] + kinds["null_caption"]
    text_frac = kinds["text"] / (kinds["text"] + n_img)
    # text docs are longer, so fewer fit per row than drawn: their share of documents is below text_ratio
    assert 0.05 < text_frac < 0.3
    assert abs(kinds["image_first"] / n_img - 0.2) < 0.05
    assert abs(kinds["null_caption"] / n_img - 0.08) < 0.04


def test_cond_gap_pairs_share_images_but_not_captions(dm):
    batch = next(iter(dm.val_dataloader()[1]))
    true, shuffled = batch.true, batch.shuffled
    assert torch.equal(true.latents, shuffled.latents)
    cap = lambda b, i: b.seq.tokens[i][: (b.seq.tokens[i] == dm.tokenizer.special.boi).nonzero()[0, 0]].tolist()  # noqa: E731
    different = sum(cap(true, i) != cap(shuffled, i) for i in range(true.num_rows))
    assert different >= 0.7 * true.num_rows
    assert (true.targets != IGNORE).any()


def test_caption_tokens_decode_to_the_prompt(dm):
    doc = dm.image_document("val", 0, np.random.default_rng(0), train_layouts=False)
    text = dm.tokenizer.decode(doc[0].ids)
    for item in dm.samples["val"][0].items:
        assert item.shape[:4] in text  # "circle", "squares", ...


def test_latent_cache_reused(dm, tmp_path):
    path = dm._cache_path("train", 96)
    assert path.is_file()
    again = ShapesDataModule(data_dir=dm.hparams.data_dir, num_train=96, num_val=48)
    again.setup("fit")
    assert torch.equal(again.latents["train"], dm.latents["train"])


def test_captions_are_true_of_their_image(dm):
    """Every caption variant (scene caption, color-filled prompt, plain prompt) states only true attributes."""
    from datamodules.shapes.scoring import caption_attributes_correct

    rng = np.random.default_rng(0)
    for i in range(60):
        scene = dm.scenes["train"][i]
        for _ in range(3):
            text = dm.tokenizer.decode(dm.caption_ids("train", i, rng))
            assert caption_attributes_correct(text, scene) == 1.0, (text, scene)


def test_with_scene_colors_fills_only_open_colors(dm):
    from datamodules.shapes.transfusion import with_scene_colors

    for i in range(40):
        prompt, scene = dm.samples["train"][i], dm.scenes["train"][i]
        filled = with_scene_colors(prompt, scene)
        for a, b in zip(prompt.items, filled.items, strict=True):
            assert (a.shape, a.count) == (b.shape, b.count)
            assert a.color is None or a.color == b.color
            if a.count == 1:
                assert b.color is not None


def test_families_restrict_prompts_and_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="families"):
        ShapesDataModule(data_dir=str(tmp_path), families=("single_object", "not_a_family"))
    dm = ShapesDataModule(data_dir=str(tmp_path), num_train=24, num_val=8, families=("colors",))
    dm.setup()
    assert {p.family for p in dm.samples["train"]} == {"colors"}
    # its own cache file: a run with all families never reads these latents
    assert "colors" in dm._cache_path("train", 24).name


def test_model_and_data_seeds_may_differ_in_a_logged_run(dm, tmp_path):
    """Both the module (its noise stream) and the datamodule (its world) take a ``seed``; a run that sets them
    differently (a sweep over model seeds on one world) must start, with its hparams logged."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_transfusion.module import TransfusionModule

    module = TransfusionModule(vocab_size=dm.vocab_size, special_ids=dm.special_ids, latent_shape=dm.latent_shape,
                               size="nano", max_seq_len=128, seed=dm.hparams.seed + 1)
    trainer = L.Trainer(max_steps=1, logger=TensorBoardLogger(str(tmp_path)), limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1
