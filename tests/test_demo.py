"""`repa-pipe demo` end to end at a reduced size: every stage runs and leaves what the README promises."""
from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from repa_pipe.cache import inspect
from repa_pipe.cli import app


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", str(out), "--resolution", "16", "--steps", "3", "--num-samples", "2"])
    assert r.exit_code == 0, r.output
    # 1. the digits as an ImageFolder: 10 classes, 1,797 images
    assert sorted(p.name for p in (out / "images").iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in (out / "images").rglob("*.png")) == 1797
    # 2. a complete, verified cache with pixel latents and tiny features on the 8x8 grid of a patch-2 model
    info = inspect.info(out / "cache")
    arrays = {a["name"]: a for a in info["arrays"]}
    assert arrays["latents/pixel"]["shape"] == [1797, 6, 16, 16]
    assert arrays["features/tiny"]["shape"][:2] == [1797, 64]
    assert all(a["status"] == "complete" for a in arrays.values())
    assert inspect.verify(out / "cache").ok
    # 3. training: checkpoint, metrics, loss curve
    assert (out / "run" / "checkpoints" / "0000003.pt").is_file()
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    # 4. sample-eval: ADM npz, grid, and one line saying metrics were skipped and which option to pass
    with np.load(out / "samples" / "samples.npz") as z:
        assert z["arr_0"].shape == (2, 16, 16, 3) and z["arr_0"].dtype == np.uint8
        assert set(z["arr_1"].tolist()) <= set(range(10))
    assert (out / "samples" / "grid.png").is_file()
    assert "metrics skipped: pass --inception-weights" in r.output
