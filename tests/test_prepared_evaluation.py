"""PreparedEvaluation on a real prepared directory (synthetic content): metrics, grid, captions, JSON, FID choices."""

from __future__ import annotations

import json
import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from callbacks.common import generate_uint8
from callbacks.prepared import PreparedEvaluation
from datamodules.files.streaming import PreparedDataModule
from lit_transfusion.batch import SpecialIds
from lit_transfusion.generation import SamplingConfig
from lit_transfusion.module import TransfusionModule
from tests.conftest import randomize_output_heads
from tests.prepared_data import write_prepared

N_VAL_PAIRS = 6
FAST = SamplingConfig(scheduler="ddim", steps=2, max_new_tokens=6)  # seconds, not minutes, on 2 CPU cores
TILE = 32 * 4 + 2  # a 32-px image upscaled x4 (lit_transfusion.grid) plus its padding


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    write_prepared(root, n_train={"pairs": 8, "mixed": 4, "corpus": 6},
                   n_val={"pairs": N_VAL_PAIRS, "mixed": 3, "corpus": 4})
    return root


@pytest.fixture
def dm(prepared):
    data = PreparedDataModule(str(prepared), seq_len=128, patch_size=2, batch_size=4, cond_gap_pairs=4)
    data.setup("validate")
    return data


@pytest.fixture
def module(dm, one_thread):
    torch.manual_seed(0)
    model = TransfusionModule(vocab_size=dm.vocab_size, special_ids=dm.special_ids, latent_shape=dm.latent_shape,
                              size="nano", max_seq_len=128, patch_size=2)
    model.attach_codec(dm.image_codec())  # outside a trainer nothing attaches the datamodule's codec
    return randomize_output_heads(model).eval()


def _texts(run_dir, tag: str) -> list[str]:
    """Every TensorBoard text logged under ``tag`` in ``run_dir``, oldest first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [make_ndarray(e.tensor_proto).item().decode() for e in events.Tensors(f"{tag}/text_summary")]


def test_compute_writes_finite_metrics_grid_and_captions(dm, module, tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="", version="tb")
    cb = PreparedEvaluation(grid_rows=3, grid_images=2, fid_images=4, fid_feature="shapes", num_captions=3,
                            ppl_documents=8, sampling=FAST)
    out = cb.compute(module, dm, "val", log_dir=tmp_path / "run", step=5, logger=logger, stage="val")
    logger.experiment.flush()

    assert sorted(out) == ["val/fid", "val/fid_n", "val/fid_real_n", "val/kid", "val/kid_std", "val/ppl_caption",
                           "val/ppl_text"]
    assert all(math.isfinite(v) for v in out.values()), out
    for name in ("val/ppl_text", "val/ppl_caption"):  # an untrained model: near-uniform, not degenerate
        assert 1.0 < out[name] < 10 * dm.vocab_size, out
    assert out["val/fid"] > 0
    # FID and KID compared fid_images generated images with as many held-out images, and say so.
    assert cb._fid.num_real == 4 and cb._fid.num_fake == 4
    assert out["val/fid_n"] == 4 and out["val/fid_real_n"] == 4

    # The real statistics are computed once: a second evaluation feeds only new fake images.
    fid = cb._fid
    again = cb.compute(module, dm, "val", step=6)
    assert cb._fid is fid and fid.num_real == 4 and fid.num_fake == 4
    assert again["val/fid"] == pytest.approx(out["val/fid"], rel=1e-4)  # same model, same seeded samples
    assert again["val/kid"] == pytest.approx(out["val/kid"], rel=1e-4)  # KID's subsets come from a fixed seed

    # Grid: the first 3 held-out captions as rows, 2 samples each, after a 256-px label column.
    png = Image.open(tmp_path / "run" / "samples" / "val_step_000005.png")
    assert png.size == (256 + 2 * TILE + 2, 3 * TILE + 2)
    prompts = _texts(logger.log_dir, "val/samples_prompts")[-1]
    for caption in dm.heldout_captions("val", 3):
        assert caption in prompts

    # Captions of the first 3 held-out images, each beside its reference caption (markdown table rows).
    table = _texts(logger.log_dir, "val/captions")[-1].splitlines()
    assert len(table) == 2 + 3
    references = [row.split(" | ")[1] for row in table[2:]]
    assert references == dm.heldout_captions("val", 3)


def test_configured_prompts_and_disabled_parts(dm, module, tmp_path):
    cb = PreparedEvaluation(prompts=["a red circle", "a blue square"], grid_images=3, fid_images=0,
                            fid_feature="shapes", num_captions=0, ppl_documents=0, sampling=FAST)
    out = cb.compute(module, dm, "val", log_dir=tmp_path, step=1, stage="test")
    assert out == {}
    png = Image.open(tmp_path / "samples" / "test_step_000001.png")
    assert png.size == (256 + 3 * TILE + 2, 2 * TILE + 2)


def test_inception_without_weights_warns_once_and_skips_fid(dm, module, tmp_path):
    cb = PreparedEvaluation(fid_feature="inception", fid_images=4, prompts=["a star"], grid_images=1,
                            num_captions=0, ppl_documents=2, sampling=FAST)  # no error at construction
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [cb.compute(module, dm, "val", log_dir=tmp_path, step=s) for s in (1, 2)]
    fid_warnings = [w for w in caught if "skips FID" in str(w.message)]
    assert len(fid_warnings) == 1, [str(w.message) for w in caught]
    assert "inception_weights" in str(fid_warnings[0].message)
    for out in outs:
        assert "val/fid" not in out and "val/ppl_text" in out


def test_missing_inception_file_and_unknown_feature_fail_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="Inception weights"):
        PreparedEvaluation(inception_weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="fid_feature"):
        PreparedEvaluation(fid_feature="clip")


def test_evaluates_any_mixed_modal_data_through_the_module(dm, module):
    # The core reads the datamodule's MixedModalData interface only, and images only through module.codec.
    cb = PreparedEvaluation(prompts=["a star"], grid_images=1, fid_images=2, fid_feature="shapes",
                            num_captions=1, ppl_documents=2, sampling=FAST)
    assert cb.check_datamodule(dm) is None and dm.evaluation_split("test") == "val"
    assert sorted(cb.compute(module, dm, "val")) == ["val/fid", "val/fid_n", "val/fid_real_n", "val/kid",
                                                     "val/kid_std", "val/ppl_caption", "val/ppl_text"]


def test_final_evaluation_uses_final_fid_images(dm, module):
    # Periodic evaluations generate fid_images; the final one final_fid_images (real set as large), and says so.
    cb = PreparedEvaluation(grid_rows=1, grid_images=1, fid_images=3, final_fid_images=5, fid_feature="shapes",
                            num_captions=0, ppl_documents=0, sampling=FAST)
    periodic = cb.compute(module, dm, "val")
    final = cb.compute(module, dm, "val", final=True)
    assert (periodic["val/fid_n"], periodic["val/fid_real_n"]) == (3, 3)
    assert (final["val/fid_n"], final["val/fid_real_n"]) == (5, 5)
    # More than the held-out split holds: all of it (N_VAL_PAIRS), never an error.
    cb.final_fid_images = 384
    assert cb.compute(module, dm, "val", final=True)["val/fid_n"] == N_VAL_PAIRS


def test_is_final_evaluation():
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from callbacks.common import is_final_evaluation

    def trainer(fn=TrainerFn.FITTING, step=5, max_steps=10, should_stop=False, epoch=0, max_epochs=-1, last=False):
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(is_last_batch=last)))
        return SimpleNamespace(state=SimpleNamespace(fn=fn), global_step=step, max_steps=max_steps,
                               should_stop=should_stop, current_epoch=epoch, max_epochs=max_epochs, fit_loop=loop)

    assert not is_final_evaluation(trainer(), "val")  # a periodic validation during fit
    assert is_final_evaluation(trainer(), "test")
    assert is_final_evaluation(trainer(fn=TrainerFn.VALIDATING), "val")  # a standalone validate
    assert is_final_evaluation(trainer(step=10), "val")  # max_steps reached
    assert is_final_evaluation(trainer(should_stop=True), "val")  # e.g. early stopping
    assert not is_final_evaluation(trainer(max_steps=-1, epoch=1, max_epochs=3, last=True), "val")
    assert is_final_evaluation(trainer(max_steps=-1, epoch=2, max_epochs=3, last=True), "val")  # last epoch's end
    assert not is_final_evaluation(trainer(max_steps=-1, epoch=2, max_epochs=3, last=False), "val")


def test_validation_hooks_write_metrics_json_history(dm, module, tmp_path):
    # every_n_evals=2: the first validation records the module's losses only, the second also this callback's.
    cb = PreparedEvaluation(every_n_evals=2, grid_rows=2, grid_images=1, fid_images=3, fid_feature="shapes",
                            num_captions=2, ppl_documents=4, sampling=FAST)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp_path), name="run"),
                        callbacks=[cb], limit_val_batches=1, limit_test_batches=1, enable_progress_bar=False,
                        enable_model_summary=False)
    for _ in range(2):
        trainer.validate(module, datamodule=dm, verbose=False)
    run = tmp_path / "run" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())
    first, second = metrics["history"]
    assert metrics["latest"] == second
    assert "val/loss" in first and "val/fid" not in first and "val/ppl_text" not in first
    for name in ("val/loss", "val/fid", "val/ppl_text", "val/ppl_caption", "val/eval_seconds"):
        assert name in second and math.isfinite(second[name]), sorted(second)
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["val_step_000000.png"]

    trainer.test(module, datamodule=dm, verbose=False)
    test = json.loads((run / "metrics_test.json").read_text())["latest"]
    for name in ("test/fid", "test/ppl_text", "test/ppl_caption", "test/loss"):
        assert name in test, sorted(test)
    assert (run / "samples" / "test_step_000000.png").is_file()


def test_generate_in_chunks_draws_new_noise_per_chunk(dm, module):
    sampler, codec = module.sampler(SpecialIds(**dm.special_ids)), module.codec
    ids = [dm.tokenizer.encode("a red circle")] * 4
    whole = generate_uint8(sampler, codec, ids, FAST)  # uint8 [4, 3, 32, 32]
    chunked = generate_uint8(sampler, codec, ids, FAST, batch_size=2)
    assert whole.shape == chunked.shape == (4, 3, 32, 32) and whole.dtype == torch.uint8
    assert torch.equal(chunked[:2], whole[:2])  # the first chunk is the unchunked call's first rows
    assert not torch.equal(chunked[2:], chunked[:2])  # the same prompts, new noise
