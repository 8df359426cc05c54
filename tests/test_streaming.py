"""PreparedDataModule: documents from stored samples, the training stream (epochs, weights, packing), validation
loaders and evaluation helpers, settings errors, exact resume through the Trainer, and DDP sharding (2 processes)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from datamodules.files.schema import IMAGE, INTERLEAVED, PAIR, TEXT, Sample, max_positions
from datamodules.files.streaming import Layout, PackCollate, PreparedDataModule, caption_document, document
from lit_transfusion.batch import CaptionPairs, Image, Text, document_length
from lit_transfusion.module import TransfusionModule
from tests.conftest import ROOT, SPECIAL, run_cli
from tests.prepared_data import write_prepared, write_split

SCRIPT = ROOT / "tests" / "distributed" / "stream_ranks.py"
PATCHES = 16  # 8x8 latents, patch_size 2


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    write_prepared(root)
    return root


def stored(root: Path, split: str = "train") -> dict[str, Sample]:
    """Every sample of ``split`` read straight from the litdata datasets, by key."""
    from litdata import StreamingDataset

    out = {}
    for source in ("pairs", "mixed", "corpus"):
        if not (root / source / split).is_dir():
            continue
        ds = StreamingDataset(str(root / source / split))
        for i in range(len(ds)):
            s = Sample.from_item(ds[i])
            out[s.key] = s
    return out


def epoch_keys(dm: PreparedDataModule) -> list[str]:
    dm.setup("fit")
    return [k for batch in dm.train_dataloader() for k in batch.meta["keys"]]


# ------------------------------------------------------------------------------- hand-built samples
def layout(**kw) -> Layout:
    args = dict(special=SPECIAL, image_first_ratio=0.0, caption_dropout=0.0, noise_limit=500, flip=True,
                sample_latents=False)
    return Layout(**{**args, **kw})


def latents(n: int, flips: int = 2, logvar: float = -6.0) -> tuple[np.ndarray, np.ndarray]:
    """[n, flips, 4, 8, 8]: stored version f of image i holds the value 10 * i + f everywhere."""
    mean = np.zeros((n, flips, 4, 8, 8), dtype=np.float16)
    for i in range(n):
        for f in range(flips):
            mean[i, f] = 10 * i + f
    return mean, np.full_like(mean, logvar)


def pair_sample(captions=((10, 11, 12), (20, 21)), flips: int = 2, logvar: float = -6.0) -> Sample:
    mean, lv = latents(1, flips, logvar)
    return Sample(key="p", kind=PAIR, tokens=np.array([t for c in captions for t in c], dtype=np.int32),
                  segments=np.array([len(c) for c in captions], dtype=np.int32), mean=mean, logvar=lv)


def interleaved_sample(segments=(3, IMAGE, 0, IMAGE, 2)) -> Sample:
    n_text = sum(n for n in segments if n >= 0)
    mean, lv = latents(sum(n == IMAGE for n in segments))
    return Sample(key="m", kind=INTERLEAVED, tokens=np.arange(30, 30 + n_text, dtype=np.int32),
                  segments=np.array(segments, dtype=np.int32), mean=mean, logvar=lv)


def text_sample() -> Sample:
    mean, lv = latents(0)
    return Sample(key="t", kind=TEXT, tokens=np.array([7, 8, 9], dtype=np.int32), segments=np.array([3]),
                  mean=mean, logvar=lv)


def ids(seg) -> list[int]:
    assert isinstance(seg, Text)
    return list(seg.ids)


# ---------------------------------------------------------------------------------------- documents
def test_pair_caption_first_layout_draws_every_caption():
    seen = set()
    for i in range(40):
        doc = document(pair_sample(), np.random.default_rng(i), layout())
        assert [type(s) for s in doc] == [Text, Image, Text]
        assert ids(doc[0])[0] == SPECIAL.bos and ids(doc[2]) == [SPECIAL.eos]
        assert doc[0].loss and doc[1].t_max == 1000
        seen.add(tuple(ids(doc[0])[1:]))
    assert seen == {(10, 11, 12), (20, 21)}


def test_pair_image_first_layout_carries_the_noise_limit():
    doc = document(pair_sample(), np.random.default_rng(0), layout(image_first_ratio=1.0, noise_limit=321))
    assert [type(s) for s in doc] == [Text, Image, Text]
    assert ids(doc[0]) == [SPECIAL.bos]
    assert doc[1].t_max == 321
    assert ids(doc[2])[-1] == SPECIAL.eos and tuple(ids(doc[2])[:-1]) in {(10, 11, 12), (20, 21)}


def test_pair_caption_dropout_layout_has_no_caption_and_no_loss_on_bos():
    doc = document(pair_sample(), np.random.default_rng(0), layout(caption_dropout=1.0))
    assert ids(doc[0]) == [SPECIAL.bos] and not doc[0].loss
    assert isinstance(doc[1], Image) and doc[1].t_max == 1000
    assert ids(doc[2]) == [SPECIAL.eos]


def test_layout_fractions_follow_the_ratios():
    lay = layout(image_first_ratio=0.3, caption_dropout=0.5)
    rng = np.random.default_rng(0)
    kinds = []
    for _ in range(2000):
        doc = document(pair_sample(), rng, lay)
        kinds.append("first" if doc[1].t_max == 500 else "dropped" if not doc[0].loss else "caption")
    frac = {k: kinds.count(k) / len(kinds) for k in ("first", "dropped", "caption")}
    assert abs(frac["first"] - 0.3) < 0.04
    assert abs(frac["dropped"] - 0.7 * 0.5) < 0.04


def test_interleaved_layout_keeps_segment_order_with_bos_and_eos():
    doc = document(interleaved_sample(), np.random.default_rng(0), layout(flip=False))
    assert [type(s) for s in doc] == [Text, Image, Image, Text]
    assert ids(doc[0]) == [SPECIAL.bos, 30, 31, 32]
    assert ids(doc[3]) == [33, 34, SPECIAL.eos]
    assert float(doc[1].latent.mean()) == 0.0 and float(doc[2].latent.mean()) == 10.0  # images in order
    sample = interleaved_sample()
    assert document_length(doc, PATCHES) == max_positions(sample, PATCHES)


def test_interleaved_starting_with_an_image_merges_bos_into_a_text_of_its_own():
    doc = document(interleaved_sample((IMAGE, 2)), np.random.default_rng(0), layout())
    assert [type(s) for s in doc] == [Text, Image, Text]
    assert ids(doc[0]) == [SPECIAL.bos] and ids(doc[2]) == [30, 31, SPECIAL.eos]


def test_text_layout():
    assert [ids(s) for s in document(text_sample(), np.random.default_rng(0), layout())] == [
        [SPECIAL.bos, 7, 8, 9, SPECIAL.eos]]


def test_flip_false_never_uses_the_stored_flip():
    def versions(lay):
        return {float(document(pair_sample(), np.random.default_rng(i), lay)[1].latent.mean()) for i in range(60)}

    assert versions(layout(flip=True)) == {0.0, 1.0}
    assert versions(layout(flip=False)) == {0.0}


def test_data_prepared_without_flips_uses_its_only_version():
    lay = layout(flip=True)
    assert {float(document(pair_sample(flips=1), np.random.default_rng(i), lay)[1].latent.mean())
            for i in range(20)} == {0.0}


def test_sample_latents_false_gives_the_mean_and_true_draws_from_the_posterior():
    lat = document(pair_sample(logvar=0.0), np.random.default_rng(0), layout(flip=False))[1].latent
    assert lat.dtype == torch.float32 and lat.shape == (4, 8, 8)
    assert torch.equal(lat, torch.zeros(4, 8, 8))
    noisy = document(pair_sample(logvar=0.0), np.random.default_rng(0), layout(flip=False, sample_latents=True))
    x = noisy[1].latent
    assert x.dtype == torch.float32 and 0.7 < float(x.std()) < 1.3  # exp(0 / 2) = 1
    small = document(pair_sample(logvar=-6.0), np.random.default_rng(0), layout(flip=False, sample_latents=True))
    assert 0.02 < float(small[1].latent.std()) < 0.08  # exp(-3) ~ 0.05


def test_caption_document_is_first_caption_and_clean_unflipped_image():
    doc = caption_document(pair_sample(), SPECIAL)
    assert ids(doc[0]) == [SPECIAL.bos, 10, 11, 12] and ids(doc[2]) == [SPECIAL.eos]
    assert torch.equal(doc[1].latent, torch.zeros(4, 8, 8))


def test_collate_is_picklable_seeded_by_epoch_and_keys():
    items = [pair_sample(logvar=0.0).to_item(), text_sample().to_item()]
    collate = PackCollate(layout(sample_latents=True), 64, 2, PATCHES)
    copy = pickle.loads(pickle.dumps(collate))
    a, b = collate(items), copy(items)
    assert a.meta["keys"] == ["p", "t"]
    assert torch.equal(a.latents, b.latents) and torch.equal(a.seq.tokens, b.seq.tokens)
    copy.epoch = 1
    assert not torch.equal(collate(items).latents, copy(items).latents)  # drawn anew every epoch


# ------------------------------------------------------------------------------------ the stream
def test_direct_writer_writes_what_litdata_optimize_writes(tmp_path):
    """tests.prepared_data writes splits with litdata's BinaryWriter in-process; ``prepare`` uses optimize."""
    items = [pair_sample().to_item() | {"key": f"k{i}"} for i in range(12)]
    write_split(tmp_path / "direct", items, "4KB")
    write_split(tmp_path / "optimize", items, "4KB", optimize=True)
    index = [json.loads((tmp_path / d / "index.json").read_text()) for d in ("direct", "optimize")]
    for i in index:
        i.pop("updated_at", None)
    assert index[0] == index[1] and len(index[0]["chunks"]) > 1
    for chunk in index[0]["chunks"]:
        name = chunk["filename"]
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "optimize" / name).read_bytes()


def test_properties_follow_the_manifest(prepared):
    dm = PreparedDataModule(str(prepared))
    assert dm.latent_shape == (4, 8, 8) and dm.image_size == 32 and dm.patches_per_image == PATCHES
    assert dm.vocab_size == dm.tokenizer.vocab_size == 300
    assert dm.special_ids == vars(dm.tokenizer.special)
    assert Path(dm.vae_path, "config.json").is_file()
    assert dm.manifest.sources["pairs"].splits["train"].samples == 40
    assert PreparedDataModule(str(prepared), patch_size=4).patches_per_image == 4


def test_an_epoch_yields_every_training_sample_once(prepared):
    keys = epoch_keys(PreparedDataModule(str(prepared), batch_size=4))
    assert sorted(keys) == sorted(stored(prepared))
    assert keys != sorted(keys)  # shuffled


def test_two_epochs_are_shuffled_differently(prepared):
    dm = PreparedDataModule(str(prepared), batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first, second = ([k for b in loader for k in b.meta["keys"]] for _ in range(2))
    assert sorted(first) == sorted(second) and first != second


def test_workers_yield_every_training_sample_once(prepared):
    keys = epoch_keys(PreparedDataModule(str(prepared), batch_size=4, num_workers=2))
    assert sorted(keys) == sorted(stored(prepared))


def test_workers_draw_new_documents_every_epoch(prepared):
    dm = PreparedDataModule(str(prepared), batch_size=4, num_workers=2, shuffle=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first, second = ([(tuple(b.meta["keys"]), b.latents) for b in loader] for _ in range(2))
    assert [k for k, _ in first] == [k for k, _ in second]  # no shuffle: the same batches of samples ...
    assert not any(torch.equal(a, b) for (_, a), (_, b) in zip(first, second, strict=True))  # ... drawn anew


def test_weights_select_sources(prepared):
    only_pairs = epoch_keys(PreparedDataModule(str(prepared), weights={"pairs": 1.0, "corpus": 0.0}))
    assert sorted(only_pairs) == sorted(k for k in stored(prepared) if k.startswith("pairs/"))
    mixed = epoch_keys(PreparedDataModule(str(prepared), weights={"pairs": 1.0, "corpus": 3.0}, docs_per_batch=4))
    assert len(mixed) == len(set(mixed))
    assert {k.split("/")[0] for k in mixed} == {"pairs", "corpus"}


def test_batches_pack_every_document_into_rows_of_seq_len(prepared):
    samples = stored(prepared)
    dm = PreparedDataModule(str(prepared), seq_len=160, batch_size=3, docs_per_batch=9)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        keys = batch.meta["keys"]
        assert batch.seq.shape[1] == 160
        assert batch.num_images == sum(samples[k].num_images for k in keys)  # no document dropped or cut
        docs = {(r, int(d)) for r in range(batch.num_rows) for d in batch.seq.doc_ids[r].unique() if d >= 0}
        assert len(docs) == len(keys)
        assert batch.latents.dtype == torch.float32 and tuple(batch.latents.shape[1:]) == (4, 8, 8)
        assert int((batch.seq.image_ids >= 0).sum()) == batch.num_images * PATCHES
        bos = dm.tokenizer.special.bos
        assert int((batch.seq.tokens == bos).sum()) == len(keys)  # one <bos> per document


def test_default_docs_per_batch_fills_about_batch_size_rows(prepared):
    dm = PreparedDataModule(str(prepared), batch_size=4)
    dm.setup("fit")
    rows = [b.num_rows for b in dm.train_dataloader()][:-1]  # the last batch holds the rest
    assert 3.5 <= np.mean(rows) <= 5, rows  # batch_size, or one more where a batch runs long


# --------------------------------------------------------------------------------------- validation
def test_val_loaders_pack_every_val_sample_and_caption_pairs(prepared):
    dm = PreparedDataModule(str(prepared), batch_size=2)
    dm.setup("validate")
    rows, pairs = dm.val_dataloader()
    val = stored(prepared, "val")
    batches = list(rows)
    assert sum(b.num_images for b in batches) == sum(s.num_images for s in val.values())
    assert all(b.num_rows <= 2 for b in batches)
    bos = dm.tokenizer.special.bos
    assert sum(int((b.seq.tokens == bos).sum()) for b in batches) == len(val)
    again = list(dm.val_dataloader()[0])
    assert all(torch.equal(a.latents, b.latents) and torch.equal(a.seq.tokens, b.seq.tokens)
               for a, b in zip(batches, again, strict=True))  # the same rows at every evaluation

    (cp,) = list(pairs)
    assert isinstance(cp, CaptionPairs)
    n_pairs = sum(s.kind == PAIR for s in val.values())
    assert cp.true.num_images == cp.shuffled.num_images == n_pairs
    assert torch.equal(cp.true.latents, cp.shuffled.latents)
    true_ids = [cp.true.seq.tokens[r][cp.true.seq.doc_ids[r] >= 0].tolist() for r in range(n_pairs)]
    shuf_ids = [cp.shuffled.seq.tokens[r][cp.shuffled.seq.doc_ids[r] >= 0].tolist() for r in range(n_pairs)]
    assert all(a != b for a, b in zip(true_ids, shuf_ids, strict=True))  # no image keeps its own caption
    assert sorted(map(tuple, true_ids)) == sorted(map(tuple, shuf_ids))  # the same captions, moved


def test_val_without_pairs_has_one_loader_and_without_val_none(tmp_path):
    root = tmp_path / "no_pairs"
    write_prepared(root, n_train={"pairs": 4, "mixed": 4}, n_val={"mixed": 3})
    dm = PreparedDataModule(str(root))
    dm.setup("validate")
    loaders = dm.val_dataloader()
    assert len(loaders) == 1 and sum(b.num_images for b in loaders[0]) > 0

    root = tmp_path / "no_val"
    write_prepared(root, n_train={"corpus": 4}, n_val={})
    dm = PreparedDataModule(str(root))
    with pytest.raises(ValueError, match="no validation sample.*so validate would run without evaluation"):
        dm.setup("validate")
    with pytest.warns(UserWarning, match="no val split"):  # the loaders themselves, asked directly
        assert dm.val_dataloader() == []
    assert dm.test_dataloader() == []


def test_evaluation_helpers(prepared):
    dm = PreparedDataModule(str(prepared), val_samples=5)
    samples = dm.eval_samples("val")
    assert [s.key.split("/")[0] for s in samples] == ["pairs"] * 5 + ["mixed"] * 4 + ["corpus"] * 5
    val = stored(prepared, "val")
    pair_keys = [s.key for s in samples if s.kind == PAIR]

    images = dm.heldout_images("val", 3)
    assert images.dtype == np.uint8 and images.shape == (3, 32, 32, 3)
    for img, key in zip(images, pair_keys[:3], strict=True):
        assert np.array_equal(img, val[key].pixels[0])
    captions = dm.heldout_captions("val", 3)
    assert captions == [dm.tokenizer.decode(val[k].texts()[0].tolist()) for k in pair_keys[:3]]
    assert all(c.startswith("a ") for c in captions)
    assert dm.heldout_images("val", 100).shape[0] == 5  # as many as there are

    docs = dm.caption_documents("val", 2)
    sp = dm.tokenizer.special
    assert ids(docs[0][0]) == [sp.bos] + val[pair_keys[0]].texts()[0].tolist() and ids(docs[0][2]) == [sp.eos]
    assert torch.equal(docs[0][1].latent, torch.from_numpy(val[pair_keys[0]].mean[0, 0].astype(np.float32)))

    texts = dm.text_documents("val", 100)
    assert len(texts) == 4 + 5
    assert all(ids(d[0])[0] == sp.bos and ids(d[-1])[-1] == sp.eos for d in texts)
    assert sum(isinstance(s, Image) for d in texts for s in d) == sum(val[s.key].num_images for s in samples
                                                                      if s.kind == INTERLEAVED)


# ------------------------------------------------------------------------------------------- errors
def test_missing_manifest_names_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.data_dir.*manifest.json"):
        PreparedDataModule(str(tmp_path))


def test_tokenizer_mismatch_is_refused(prepared, tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    shutil.copy(prepared / "manifest.json", root)
    text = (prepared / "tokenizer.json").read_text()
    (root / "tokenizer.json").write_text(json.dumps(json.loads(text), indent=1))  # same tokens, other bytes
    with pytest.raises(ValueError, match="data.data_dir.*tokenizer.json.*does not match.*prepared with"):
        PreparedDataModule(str(root))
    (root / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="data.data_dir.*tokenizer.json"):
        PreparedDataModule(str(root))


def test_seq_len_smaller_than_prepared_is_refused(prepared):
    with pytest.raises(ValueError, match=r"data.seq_len=64 .*seq_len=128"):
        PreparedDataModule(str(prepared), seq_len=64)
    PreparedDataModule(str(prepared), seq_len=256)  # longer rows are fine


def test_patch_size_must_divide_and_not_add_patches(prepared):
    with pytest.raises(ValueError, match=r"model.patch_size=1 gives 64 patches.*patch_size=2"):
        PreparedDataModule(str(prepared), patch_size=1)
    with pytest.raises(ValueError, match=r"model.patch_size=3 must divide the latent grid 8x8"):
        PreparedDataModule(str(prepared), patch_size=3)


def test_weights_errors_name_the_setting_and_the_sources(prepared):
    with pytest.raises(ValueError, match=r"data.weights names unknown sources \['captions'\].*'corpus'.*'pairs'"):
        PreparedDataModule(str(prepared), weights={"captions": 1.0})
    with pytest.raises(ValueError, match=r"data.weights must be finite and >= 0"):
        PreparedDataModule(str(prepared), weights={"pairs": -1.0})
    with pytest.raises(ValueError, match=r"data.weights leaves no source"):
        PreparedDataModule(str(prepared), weights={"pairs": 0.0})


# ------------------------------------------------------------------------------------ no validation data
class Stop(Exception):
    pass


class StopAtFirstStep(Callback):
    """Records whether a training step began (and ends the run there: the test needs no more)."""

    started = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started = True
        raise Stop


def fit_stops(root: Path, tmp: Path, **trainer_args) -> bool:
    """Fit a nano model on ``root``; whether a training step began."""
    dm = PreparedDataModule(str(root), batch_size=2)
    module = TransfusionModule(vocab_size=dm.vocab_size, special_ids=dm.special_ids, latent_shape=dm.latent_shape,
                               size="nano", max_seq_len=128)
    probe = StopAtFirstStep()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        callbacks=[probe], default_root_dir=tmp, **trainer_args)
    with pytest.raises(Stop):
        trainer.fit(module, datamodule=dm)
    return probe.started


def test_fit_without_validation_data_stops_before_training_naming_the_setting(tmp_path):
    root = tmp_path / "no_val"
    write_prepared(root, n_train={"pairs": 4, "corpus": 4}, n_val={})
    with pytest.raises(ValueError) as error:  # not Stop: it came before the first training step
        fit_stops(root, tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"data.data_dir: {str(root)!r} holds no validation sample")
    assert "so fit would run without evaluation" in message
    assert "'pairs', 'corpus'" in message and "val_fraction" in message and "trainer.limit_val_batches: 0" in message
    # asking for no validation explicitly trains
    assert fit_stops(root, tmp_path, limit_val_batches=0)


def test_fit_without_validation_data_is_one_error_line_on_the_command_line(tmp_path):
    root = tmp_path / "no_val"
    write_prepared(root, n_train={"pairs": 4}, n_val={})
    override = tmp_path / "fit.yaml"
    override.write_text(json.dumps({"data": {"init_args": {"data_dir": str(root), "weights": None}}}))
    proc = run_cli("fit", "--config", "configs/imagefolder/fit.yaml", "--config", str(override),
                   "--model.init_args.size=nano", "--trainer.max_steps=2",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data.data_dir: {str(root)!r} holds no validation sample")
    assert "so fit would run without evaluation" in last and "val_fraction" in last
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [last]
    assert not list(tmp_path.rglob("*.ckpt"))  # no step trained, nothing saved


# ------------------------------------------------------------------------------------------- resume
class RecordBatches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, tuple(batch.meta["keys"]),
                          float(batch.latents.double().sum()), int(batch.seq.tokens.sum())))


def fit(root: Path, tmp: Path, max_steps: int, ckpt_path=None, checkpoint_every=None, **data) -> list[tuple]:
    L.seed_everything(0, verbose=False)
    dm = PreparedDataModule(str(root), seq_len=128, batch_size=2, docs_per_batch=4, **data)
    module = TransfusionModule(vocab_size=dm.vocab_size, special_ids=dm.special_ids, latent_shape=dm.latent_shape,
                               size="nano", max_seq_len=128, warmup_steps=1, attention="sdpa")
    record = RecordBatches()
    callbacks = [record]
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=checkpoint_every, save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(checkpoint_every),
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=tmp)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return record.seen


@pytest.mark.parametrize("weights", [None, {"pairs": 1.0, "corpus": 1.0}], ids=["every-sample", "weighted"])
def test_resume_continues_the_stream_exactly(prepared, tmp_path, weights, one_thread):
    k = 3
    full = fit(prepared, tmp_path / "full", 2 * k, checkpoint_every=k, weights=weights)
    (ckpt,) = (tmp_path / "full" / "ckpt").glob(f"*step={k}*.ckpt")
    resumed = fit(prepared, tmp_path / "resumed", 2 * k, ckpt_path=ckpt, weights=weights)
    restarted = fit(prepared, tmp_path / "restarted", k, weights=weights)
    assert [s[0] for s in resumed] == list(range(k, 2 * k))
    # the same samples, laid out and noised the same way (the weighted mix is read one batch ahead by Lightning)
    assert resumed == full[k:]
    assert restarted == full[:k]
    assert [s[1] for s in resumed] != [s[1] for s in restarted]


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_ranks_split_an_epoch_without_repeats(prepared, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    for var in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK"):
        env.pop(var, None)  # a fresh rendezvous (Lightning picks a free port)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(prepared), "--out", str(out),
                           "--docs_per_batch", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["backend"]) for r in records] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert len(records[0]["batches"]) == len(records[1]["batches"])  # DDP needs the same number of steps
    keys = [[k for b in r["batches"] for k in b] for r in records]
    assert all(len(k) == len(set(k)) for k in keys)
    assert not set(keys[0]) & set(keys[1]), "both ranks trained on the same samples"
    everything = set(stored(prepared))
    union = set(keys[0]) | set(keys[1])
    assert union <= everything
    # litdata gives each rank the same whole number of 2-document batches per source: of corpus' 30 samples,
    # 15 batches -> 7 per rank -> 28 trained on; pairs (40) and mixed (12) divide evenly.
    missing = everything - union
    assert {k.split("/")[0] for k in missing} <= {"corpus"} and len(missing) == 2
