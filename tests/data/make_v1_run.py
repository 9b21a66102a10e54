"""How tests/data/v1_run was made: a 2-step SiT-T/2 run written by repa-pipe at commit f00876e (the release
before the typed checkpoint), kept so every later loader is tested against files that release wrote.

Run from the repository root at that commit: `PYTHONPATH=. python tests/data/make_v1_run.py`. The cache is
rebuilt by the tests with `make_cache(root, CacheOpts())` (tests/train_fixtures.py), which is deterministic.
"""
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_fixtures import make_cache  # noqa: E402

from repa_pipe.stages import train  # noqa: E402
from repa_pipe.training.config import TrainConfig  # noqa: E402

torch.set_num_threads(1)
out = Path(__file__).parent / "v1_run"
with tempfile.TemporaryDirectory() as tmp:
    cache = make_cache(Path(tmp) / "c")
    run = Path(tmp) / "run"
    train.run(TrainConfig(cache=cache, run_dir=run, model="SiT-T/2", encoder=("dinov2-b",), encoder_depth=2,
                          projector_dim=16, global_batch_size=8, steps=2, lr=1e-3, log_every=1, ckpt_every=1000,
                          sample_every=0, precision="fp32", loader_threads=1))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    shutil.copy(run / "config.json", out / "config.json")
    (out / "checkpoints").mkdir()
    shutil.copy(run / "checkpoints" / "0000002.pt", out / "checkpoints" / "0000002.pt")
