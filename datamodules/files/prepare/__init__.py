"""``python -m lit_transfusion prepare --config configs/imagefolder/prepare.yaml``: a user's data, prepared once.

For every source (image-caption folder, WebDataset shards, interleaved JSON lines, text corpus) and split:
read the raw samples, decode and check each image (mode -> RGB, EXIF orientation, resize + center crop),
encode it and its horizontal flip with the frozen VAE (posterior mean and log-variance, standardized),
tokenize the text (truncating a caption that cannot fit, splitting a long document at segment boundaries),
and write the result with ``litdata.optimize`` to ``out_dir/<source>/<split>/`` (chunked, memory-mapped,
streamable, sharded across ranks at training time). ``out_dir/manifest.json`` records how (VAE, tokenizer,
sizes) and what (samples written, samples skipped by reason with the first offending paths).

Bad samples never stop the run: each is skipped and counted. A source with no valid training sample is an
error naming it. A rerun skips every (source, split) already written with the same settings.

Validation: a source without validation data of its own (``val_path``, an imagefolder ``validation/`` folder) and
without a ``val_fraction`` of its own holds out ``val_fraction`` (default 5 %) of its samples, at least
``min_val_samples``, chosen by a stable hash of each sample's key (:func:`with_validation`). Every kind does, text
too: ``fit`` evaluates on whatever held-out data there is (losses, text and caption perplexity, FID on held-out
images) and refuses a directory without any. A source's ``val_fraction: 0`` asks for no validation split.

VAE check: the VAE reconstructs the first ``vae_psnr_images`` training images of each source with images; the
report and the manifest give the PSNR, and the report warns below ``vae_min_psnr`` (a VAE trained on other
images: the model would learn, and generate, its distortions), naming the config that trains one on them.

Modules: ``run`` (the :func:`prepare` function), ``command`` (its command line), ``checks`` (settings checked
first), ``validation`` (the held-out split), ``tokenizer`` (copied or BPE-trained), ``encode`` (the
:class:`Encoder` workers run), ``write`` (one source split as litdata chunks), ``vae_check``, ``report``,
``settings`` (what workers share, and the rerun digest), ``errors``.
"""

from datamodules.files.prepare.command import main, prepare_parser
from datamodules.files.prepare.encode import Encoder, split_document
from datamodules.files.prepare.errors import PrepareError
from datamodules.files.prepare.report import VAE_CONFIG, report
from datamodules.files.prepare.run import prepare
from datamodules.files.prepare.settings import Settings
from datamodules.files.prepare.vae_check import reconstruction_psnr
from datamodules.files.prepare.validation import with_validation

__all__ = ["VAE_CONFIG", "Encoder", "PrepareError", "Settings", "main", "prepare", "prepare_parser",
           "reconstruction_psnr", "report", "split_document", "with_validation"]
