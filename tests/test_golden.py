"""Golden run: a fixed 20-step SiT-T/2 + REPA run on a fixed tiny cache, its loss curve and final EMA pinned, so a
refactor that changes training numerics fails here loudly.

What is pinned, and why so (docs/CONTRACTS.md, "Golden run"):
- the loss of each of the 20 steps (metrics.jsonl, log every step) to rtol 1e-5: on CPU in fp32 with one thread the
  run is deterministic, but a torch release may change a kernel's summation order in the last bits;
- the EMA weights' hash (pipeline.hashing.hash_state_dict) for each torch version it was pinned on: bit-exact on
  that version; on a torch version with no pinned hash, per-tensor sums and absolute sums of the EMA weights to
  rtol 1e-5 instead (the same last-bits argument).

Re-pin on purpose (a deliberate numeric change, or a new torch version's hash):
`REPA_REPIN=1 python -m pytest tests/test_golden.py` rewrites tests/data/golden.json (hashes of other torch versions
are kept unless the curve changed), then commit it with the reason.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from train_fixtures import make_cache

from repa_pipe.pipeline.hashing import hash_state_dict
from repa_pipe.stages import train
from repa_pipe.training.config import TrainConfig

PINNED = Path(__file__).parent / "data" / "golden.json"
RTOL = 1e-5

pytestmark = pytest.mark.golden


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    yield


def golden_run(root: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(loss per step, final EMA state dict) of the fixed run."""
    cache = make_cache(root / "cache")  # 8 rows, pixel latents 3x8x8, dinov2-b 4x4x32, 4 classes
    run = root / "run"
    # EMA decay 0.9 (not the default 0.9999): over 20 steps the EMA then moves as far as the weights do
    train.run(TrainConfig(cache=cache, run_dir=run, model="SiT-T/2", encoder=("dinov2-b",), encoder_depth=2,
                          projector_dim=16, global_batch_size=8, steps=20, lr=1e-3, log_every=1, ckpt_every=20,
                          sample_every=0, precision="fp32", loader_threads=1, seed=0, ema_decay=0.9))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    ema = torch.load(run / "checkpoints" / "0000020.pt", weights_only=True)["ema"]
    return losses, ema


def ema_stats(ema: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor: [sum, sum of |x|] in float64, the fallback when no hash is pinned for this torch."""
    return {k: [v.double().sum().item(), v.double().abs().sum().item()] for k, v in sorted(ema.items())}


def test_golden_run_matches_the_pinned_curve_and_ema(tmp_path):
    losses, ema = golden_run(tmp_path)
    digest, stats = hash_state_dict(ema, n=64), ema_stats(ema)
    assert len(losses) == 20
    if os.environ.get("REPA_REPIN") == "1":
        old = json.loads(PINNED.read_text()) if PINNED.is_file() else {}
        same_curve = old.get("loss") == losses
        hashes = {**(old.get("ema_sha256") if same_curve else {}), torch.__version__: digest}
        PINNED.write_text(json.dumps({"loss": losses, "ema_sha256": hashes, "ema_stats": stats}, indent=1) + "\n")
        pytest.skip(f"re-pinned {PINNED}")
    pinned = json.loads(PINNED.read_text())
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(pinned["loss"], dtype=torch.float64), rtol=RTOL, atol=0)
    if torch.__version__ in pinned["ema_sha256"]:
        assert digest == pinned["ema_sha256"][torch.__version__], "EMA weights changed (REPA_REPIN=1 to re-pin)"
    else:
        assert stats.keys() == pinned["ema_stats"].keys()
        for k, (s, a) in pinned["ema_stats"].items():
            assert stats[k][0] == pytest.approx(s, rel=RTOL, abs=1e-6), k
            assert stats[k][1] == pytest.approx(a, rel=RTOL), k
