import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_transfusion.batch import Image, SpecialIds, Text

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def special() -> SpecialIds:
    return SPECIAL


def random_documents(gen: torch.Generator, n_docs: int, latent_shape=(4, 4, 4), vocab=50, max_images=3):
    """Random documents: text runs of random length with 0..max_images images in between."""
    def ids(most: int) -> list[int]:
        n = int(torch.randint(0, most, (1,), generator=gen))
        return torch.randint(5, vocab, (n,), generator=gen).tolist()

    docs = []
    for _ in range(n_docs):
        doc = [Text([SPECIAL.bos] + ids(6))]
        for _ in range(int(torch.randint(0, max_images + 1, (1,), generator=gen))):
            doc.append(Image(torch.randn(latent_shape, generator=gen)))
            doc.append(Text(ids(4)))
        doc.append(Text([SPECIAL.eos]))
        docs.append(doc)
    return docs


def small_run_args(tmp: Path) -> list[str]:
    """Shrink the tiny config to seconds: a nano model, 64 training images, 2 steps."""
    return [
        "--model.init_args.size=nano",
        f"--data.init_args.data_dir={tmp / 'cache'}",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=32",
        "--data.init_args.val_rows=4",
        "--data.init_args.cond_gap_pairs=16",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
    ]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lit_transfusion", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A 2-step fit of the tiny config (nano model); returns its run directory."""
    tmp = tmp_path_factory.mktemp("run")
    proc = run_cli("fit", "--config", "configs/shapes/tiny.yaml", *small_run_args(tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "shapes-tiny" / "version_0"


def randomize_output_heads(model, seed: int = 0, std: float = 0.02):
    """Give the patcher's noise-output layers (``patcher.output_layers()``, zero at init) random N(0, std)
    weights and biases, so the predicted noise of a fresh model depends on its inputs. ``model``: a
    TransfusionModel or a TransfusionModule. Seeded by ``seed`` alone; returns ``model``."""
    net = getattr(model, "model", model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.patcher.output_layers():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (restored afterwards). Nano models are far too small to gain from
    two, and on a shared 2-core machine two spinning threads make each tiny matmul many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
