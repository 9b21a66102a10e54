"""The run contract (run/checkpoint.py, run/record.py): the files of today's release and of 0.2 load through the one
loader, the reference's `last.pt` layouts too, unknown format versions are refused naming the version, every load is
memory-mapped, and a run's saved config is what was typed plus what was derived.

tests/data/v1_run was written by repa-pipe 0.2 (tests/data/make_v1_run.py says how): a 2-step SiT-T/2 run.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import invoke, ok
from train_fixtures import make_cache

from repa_pipe.pipeline import checkpoint as files
from repa_pipe.pipeline.errors import CheckpointError
from repa_pipe.run import checkpoint as ckpt
from repa_pipe.run.record import read_record
from repa_pipe.sampling.config import SampleEvalConfig
from repa_pipe.run.model import load_model
from repa_pipe.stages import sample_eval

V1_RUN = Path(__file__).parent / "data" / "v1_run"
V1_CKPT = V1_RUN / "checkpoints" / "0000002.pt"
ARGS = ["--model", "SiT-T/2", "--projector-dim", "16", "--global-batch-size", "8", "--lr", "1e-3", "--log-every",
        "1", "--sample-every", "0", "--precision", "fp32", "--loader-threads", "1", "--ckpt-every", "1000"]


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    yield


@pytest.fixture
def v1_run(tmp_path) -> Path:
    """The 0.2 run beside the cache it was trained on (rebuilt: make_cache is deterministic), as `../c`."""
    make_cache(tmp_path / "c")
    run = tmp_path / "run"
    shutil.copytree(V1_RUN, run)
    return run


# ------------------------------------------------------------------------------------------------ old files load
def test_a_checkpoint_of_release_0_2_loads_typed():
    ck = ckpt.load(V1_CKPT)
    assert ck.kind == "checkpoint" and ck.format == "repa-pipe-train/1" and ck.step == 2
    assert ck.facts == ckpt.TrainFacts(model="SiT-T/2", path="linear", encoder_depth=2)
    assert ck.resolved == {} and ck.config["latents"] == "pixel"  # 0.2 saved the derived values in config
    assert ck.view is not None and ck.view.latents == "latents/pixel" and ck.view.feature_dims == (32,)
    assert ck.cache_identity is None and ck.training is not None and "pos_embed" in ck.ema


def test_a_run_record_of_release_0_2_reads_typed():
    record = read_record(V1_RUN)
    assert record.facts.model == "SiT-T/2" and record.facts.encoder_depth == 2
    assert record.cache.view.num_classes == 4 and record.cache.identity is None and record.resolved == {}


def test_a_run_of_release_0_2_resumes_and_its_record_gains_the_new_sections(v1_run):
    before = read_record(v1_run)
    result = ok(["train", "--cache", v1_run.parent / "c", "--run-dir", v1_run, "--encoder", "dinov2-b",
                 "--steps", "3", *ARGS])
    assert f"resumed from {files.ckpt_path(v1_run, 2)} at step 2 with changed options: --steps 2 -> 3" in result.stderr
    record = json.loads((v1_run / "config.json").read_text())
    assert record["format"] == "repa-pipe-run/2" and record["config"] == json.loads(
        (V1_RUN / "config.json").read_text())["config"]  # the first train's options stay as they were saved
    assert record["cache"]["identity"]["file_list_sha256"] == "f" * 64
    changed = record["history"][-1]["changed"]  # the cache moved since (it was rebuilt): recorded too
    assert changed == {"steps": [2, 3], "cache": ["/tmp/tmpevn56itx/c", str((v1_run.parent / "c").resolve())]}
    new = ckpt.load(files.ckpt_path(v1_run, 3))
    assert new.format == ckpt.TRAIN_FORMAT and new.step == 3 and new.facts.encoder_depth == 2
    assert new.config["latents"] is None and new.resolved["latents"]["value"] == "pixel"
    assert before.created_utc == record["created_utc"]


def test_a_run_of_release_0_2_samples(v1_run, tmp_path):
    out = tmp_path / "out"
    sample_eval.run(SampleEvalConfig(out=out, run_dir=v1_run, num_samples=2, num_steps=2, batch_size=2,
                                     shard_size=2))
    man = json.loads((out / "manifest.json").read_text())
    assert man["weights_kind"] == "checkpoint" and man["step"] == 2 and man["decoder"][0] == "pixel"


def test_the_references_last_pt_layouts_load(tmp_path):
    ema = ckpt.load(V1_CKPT).ema
    bare, full = tmp_path / "last.pt", tmp_path / "0400000.pt"
    torch.save(dict(ema), bare)  # the published last.pt: the EMA state dict alone
    import argparse
    torch.save({"model": dict(ema), "ema": dict(ema), "opt": {}, "steps": 400000,
                "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=8)}, full)
    for path, step in ((bare, None), (full, 400000)):
        ck = ckpt.load(path)
        assert ck.kind == "reference" and ck.step == step and ck.training is None and ck.config == {}
        assert ck.ema.keys() == ema.keys()
        loaded = load_model(None, str(path), "SiT-T/2", torch.device("cpu"))
        assert loaded.kind == "reference" and loaded.model.encoder_depth == 2  # the preset's: nothing recorded


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("fmt", ["repa-pipe-train/3", "repa-pipe-train/99"])
def test_an_unknown_format_version_is_refused_naming_it(tmp_path, fmt):
    d = torch.load(V1_CKPT, weights_only=True)
    d["format"] = fmt
    path = tmp_path / "new.pt"
    torch.save(d, path)
    with pytest.raises(CheckpointError, match=f"format {fmt} is not one this repa-pipe reads"):
        ckpt.load(path)
    result = invoke(["sample-eval", "--ckpt", path, "--out", tmp_path / "out"])
    assert result.exit_code == 1 and fmt in result.stderr and "Traceback" not in result.output


def test_resuming_from_weights_only_is_refused(v1_run, tmp_path):
    ck = ckpt.load(V1_CKPT)
    torch.save(dict(ck.ema), files.ckpt_path(v1_run, 3))  # a bare state dict where the run's newest should be
    result = invoke(["train", "--cache", v1_run.parent / "c", "--run-dir", v1_run, "--encoder", "dinov2-b",
                     "--steps", "4", *ARGS])
    assert result.exit_code == 1 and "holds EMA weights only" in result.stderr


# ------------------------------------------------------------------------------------------------ one loader, mapped
def test_every_checkpoint_load_is_memory_mapped_weights_only_on_the_cpu(monkeypatch):
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(files.torch, "load", spy)
    ck = ckpt.load(V1_CKPT)
    assert seen == [{"mmap": True, "weights_only": True, "map_location": "cpu"}]
    # and the tensors live in the mapped file's pages, not in private copies (Linux: /proc/self/maps)
    spans = [tuple(int(a, 16) for a in line.split()[0].split("-"))
             for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(V1_CKPT.resolve()))]
    assert spans and all(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in ck.ema.values())


def test_the_old_name_of_the_aligned_block_is_read(tmp_path):
    d = torch.load(V1_CKPT, weights_only=True)
    d["config"]["align_depth"] = d["config"].pop("encoder_depth")
    path = tmp_path / "old.pt"
    torch.save(d, path)
    assert ckpt.load(path).facts.encoder_depth == 2
