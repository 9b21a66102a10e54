"""The device a stage runs on, and the per-device choices that make it fast on CUDA without changing CPU numbers:
device pinning (REPA_PIPE_DEVICE), precision scopes that restore TF32 flags, `auto` precisions, AdamW kernels,
DDP options. The CUDA side of each is checked in tests/test_gpu.py (marker `gpu`)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from repa_pipe.cache.manifest import read_manifest, training_view
from repa_pipe.cache.reader import check_labels
from repa_pipe.encoding import runner
from repa_pipe.pipeline import dist, precision
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.sampling.config import SampleEvalConfig
from repa_pipe.sampling.sampler import Sampler
from repa_pipe.training import state as st
from repa_pipe.training import step as stp
from repa_pipe.training.config import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import latents_spec_of, Latents, make_cache  # noqa: E402

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu_in_the_box(monkeypatch):
    """torch reports a GPU (none is touched: the tests only check which device and settings are chosen)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def flags():
    """The process's TF32 flags, restored after the test whatever it does."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


# ------------------------------------------------------------------------------------------------ device pinning
def test_suite_pins_the_cpu_even_with_a_gpu_in_the_box(gpu_in_the_box):
    assert dist.device() == torch.device("cpu")  # conftest.py sets REPA_PIPE_DEVICE=cpu for every test


def test_device_env_chooses_and_unset_means_the_gpu(gpu_in_the_box, monkeypatch):
    monkeypatch.setenv(dist.DEVICE_ENV, "cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.device() == torch.device("cuda", 1)
    monkeypatch.delenv(dist.DEVICE_ENV)
    assert dist.device() == torch.device("cuda", 1)


@pytest.mark.parametrize("value", ["tpu", "gpu0"])
def test_bad_device_env_is_one_line(monkeypatch, value):
    monkeypatch.setenv(dist.DEVICE_ENV, value)
    with pytest.raises(ConfigError, match=f"{dist.DEVICE_ENV}='{value}': must be cpu or cuda"):
        dist.device()


def test_cuda_asked_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(dist.DEVICE_ENV, "cuda")
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        dist.device()


def test_pinned_cpu_ranks_join_with_gloo_and_touch_no_gpu(gpu_in_the_box, monkeypatch):
    """torchrun ranks of the test suite on a GPU box: gloo, and no set_device (which fails with fewer GPUs than
    ranks)."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.tdist, "init_process_group", lambda backend, **kw: seen.setdefault("backend", backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("set_device", i))
    monkeypatch.setattr(dist, "_cpu_group", lambda: None)
    dist.init()
    assert seen == {"backend": "gloo"}


# ------------------------------------------------------------------------------------------------ precision scopes
def test_tf32_scope_restores_the_callers_flags(flags):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    with precision.compute("tf32", CUDA):
        assert tf32_flags() == (True, True)
    assert tf32_flags() == (False, True)
    with precision.compute("fp32", CUDA):  # strict fp32 on CUDA: cuDNN's TF32 default switched off too
        assert tf32_flags() == (False, False)
    assert tf32_flags() == (False, True)
    with pytest.raises(RuntimeError), precision.tf32(True):
        raise RuntimeError("an error inside the scope")
    assert tf32_flags() == (False, True)


def test_cpu_precisions_touch_no_flag_and_auto_is_fp32(flags):
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in ("fp32", "tf32"):
        with precision.compute(name, "cpu"):
            assert tf32_flags()[0] is False
    for stage in precision.AUTO_CUDA:
        assert precision.resolve("auto", "cpu", stage) == "fp32"
        assert precision.resolve("auto", CUDA, stage) == precision.AUTO_CUDA[stage]
    assert precision.resolve("tf32", "cpu", "sample") == "fp32" and precision.resolve("tf32", CUDA, "sample") == "tf32"
    x = torch.randn(8, 8)
    with precision.compute("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16


def test_training_step_does_not_leave_tf32_set_for_the_process(flags, tmp_path, monkeypatch):
    """Before: setup_device switched TF32 on for the whole process on CUDA, and later work (other tests, the
    metrics' Inception) inherited it. Now each step's forward/backward scopes it."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    monkeypatch.setattr(dist, "device", lambda: CUDA)
    cfg = TrainConfig(cache=tmp_path, run_dir=tmp_path / "run", model="SiT-T/2", tf32=True)
    assert stp.setup_device(cfg) == CUDA
    assert tf32_flags() == (False, False)


def test_sample_eval_auto_is_fp32_on_cpu_and_bf16_on_cuda(tmp_path):
    cfg = SampleEvalConfig(out=tmp_path, run_dir=tmp_path)
    assert cfg.precision == "auto"
    model = torch.nn.Linear(1, 1)
    assert Sampler(cfg, model, lambda z: z, torch.device("cpu")).precision == "fp32"
    assert Sampler(cfg, model, lambda z: z, CUDA).precision == "bf16"
    asked = dataclasses.replace(cfg, precision="fp32")
    assert Sampler(asked, model, lambda z: z, CUDA).precision == "fp32"
    # shards already made in fp32 (before `auto`, or on a CPU): a resume with auto goes on in fp32
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "sampling.json").write_text('{"precision": "fp32"}')
    assert Sampler(cfg, model, lambda z: z, CUDA).precision == "bf16"  # no shard yet: nothing to match
    (tmp_path / "shards" / "000000.npz").write_bytes(b"")
    assert Sampler(cfg, model, lambda z: z, CUDA).precision == "fp32"


def test_encode_auto_keeps_an_array_in_the_precision_it_was_begun_in(tmp_path):
    """A cache begun in fp32 (before `auto`, or on a CPU) and resumed on a GPU with the default continues in fp32
    instead of being refused as made differently; an explicit other precision is still a different array."""
    cache = make_cache(tmp_path / "c")
    begun = latents_spec_of(Latents(), 8)
    assert read_manifest(cache).arrays[begun.name].spec.precision == "fp32"
    now = dataclasses.replace(begun, precision="tf32")
    assert runner.resume_precision(cache, now, "auto") == begun
    assert runner.resume_precision(cache, now, "tf32").precision == "tf32"
    assert runner.resume_precision(tmp_path / "new", now, "auto").precision == "tf32"


# ------------------------------------------------------------------------------------------------ optimizer, DDP
def test_adamw_is_fused_on_cuda_and_torchs_default_on_cpu():
    assert st.adamw_impl(CUDA) == {"fused": True}
    assert st.adamw_impl(torch.device("cpu")) == {}


def test_resume_uses_this_devices_adamw_kernels(tmp_path):
    """A checkpoint saved by the fused CUDA optimizer resumes on a CPU with the CPU's kernels (and vice versa):
    torch's load_state_dict would otherwise take the saving machine's `fused` flag."""
    cache = make_cache(tmp_path / "c")
    cfg = TrainConfig(cache=cache, run_dir=tmp_path / "run", model="SiT-T/2", encoder_depth=2, projector_dim=16,
                      global_batch_size=8, latents="pixel")
    m = read_manifest(cache)
    view = training_view(m, check_labels(cache, m), "pixel", ("dinov2-b",))
    state = st.new_state(cfg, view, torch.device("cpu"))
    ck = state.checkpoint({}, {}, view, None, tmp_path / "ck.pt")
    ck.training.opt["param_groups"][0]["fused"] = True  # as saved on a GPU
    fresh = st.new_state(cfg, view, torch.device("cpu"))
    st.load_into(fresh, ck, cfg)
    assert fresh.opt.param_groups[0]["fused"] is None and fresh.opt.param_groups[0]["foreach"] is None


def test_ddp_gradients_are_bucket_views():
    opts = stp.ddp_options(torch.device("cpu"))
    assert opts == {"device_ids": None, "gradient_as_bucket_view": True}
    assert stp.ddp_options(CUDA)["device_ids"] == [0]
