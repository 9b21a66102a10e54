"""The command line itself: options == config dataclass fields (by introspection), --help everywhere, cache info."""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import typer.main

from fixtures import RES, imagefolder_index, invoke, make_imagefolder, ok, read_array, subprocess_env
from repa_pipe.cli import app

# command -> (module, config dataclass) for every stage command that builds a config from its options
CONFIGS = {
    "encode-latents": ("repa_pipe.encoding.config", "EncodeLatentsConfig"),
    "encode-features": ("repa_pipe.encoding.config", "EncodeFeaturesConfig"),
    "train": ("repa_pipe.training.config", "TrainConfig"),
    "demo": ("repa_pipe.demo.config", "DemoConfig"),
    "sample-eval": ("repa_pipe.sampling.config", "SampleEvalConfig"),
    "export": ("repa_pipe.sampling.config", "ExportConfig"),
    "analyze": ("repa_pipe.analysis.config", "AnalyzeConfig"),
    "cache info": ("repa_pipe.cache.options", "CacheInfoConfig"),
    "cache verify": ("repa_pipe.cache.options", "CacheVerifyConfig"),
}


def root_command():
    """The click command tree Typer builds (Typer >= 0.2x vendors its own click: duck-type, no isinstance)."""
    return typer.main.get_command(app)


def is_group(cmd) -> bool:
    return isinstance(getattr(cmd, "commands", None), dict)


def is_option(param) -> bool:
    return param.param_type_name == "option"


def all_commands() -> list:
    """Every command and sub-command of the app, found by walking the click tree (not a hand list)."""
    out = []

    def walk(cmd, path: list[str]) -> None:
        out.append((path, cmd))
        if is_group(cmd):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, path + [name])

    walk(root_command(), [])
    return out


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def command_at(path: str):
    cmd = root_command()
    for part in path.split():
        cmd = cmd.commands.get(part)
        assert cmd is not None, f"no `{path}` command"
    return cmd


@pytest.mark.parametrize("name", CONFIGS)
def test_command_options_match_config_dataclass(name):
    cmd = command_at(name)
    module, cls_name = CONFIGS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    params = {p.name: p for p in cmd.params if p.name != "debug"}  # --debug: every command's, not the config's
    assert list(params) == list(fields), f"{name}: options {list(params)} vs {cls_name} fields {list(fields)}"
    for pname, p in params.items():
        f = fields[pname]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if is_option(p):
            assert f"--{pname.replace('_', '-')}" in p.opts, (name, pname, p.opts)
        if not has_default:
            assert p.required, f"{name} {pname}: required in {cls_name} but optional on the command line"
            continue
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert not p.required, f"{name} {pname}: has a default in {cls_name} but is required"
        assert _norm(p.default) == _norm(want), f"{name} --{pname}: CLI default {p.default!r} vs config {want!r}"


def test_help_works_for_every_command_and_lists_every_option():
    commands = all_commands()
    names = {" ".join(path) for path, _ in commands}
    assert {"", "encode-latents", "encode-features", "cache", "cache info", "cache verify", "train", "sample-eval",
            "analyze", "export", "demo"} <= names
    for path, cmd in commands:
        r = invoke([*path, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
        assert r.exit_code == 0, (path, r.output)
        assert "Traceback" not in r.output
        if is_group(cmd):
            for sub in cmd.commands:
                assert sub in r.output, (path, sub)
            continue
        for p in cmd.params:
            if is_option(p):
                assert any(o in r.output for o in p.opts), (path, p.opts, r.output)
            else:
                shown = p.metavar or p.name  # an argument shows its metavar (e.g. RUN)
                assert re.search(rf"\b{re.escape(shown)}\b", r.output, re.I), (path, shown, r.output)


def test_python_dash_m_runs_the_cli(tmp_path):
    p = subprocess.run([sys.executable, "-m", "repa_pipe.cli", "--help"], capture_output=True, text=True,
                       env=subprocess_env(tmp_path), timeout=120)
    assert p.returncode == 0, p.stderr
    assert "encode-latents" in p.stdout and "encode-features" in p.stdout


def test_bad_option_value_is_a_one_line_error(tmp_path):
    src = make_imagefolder(tmp_path / "imgs", classes=("a",), per_class=2)
    for args, words in ((["encode-latents", "--vae", "nope"], "--vae"), (["encode-latents", "--dtype", "int8"], "--dtype"),
                        (["encode-features", "--encoder", "dinov9"], "--encoder"),
                        (["encode-features", "--encoder", "tiny", "--grid", "0"], "--grid")):
        r = invoke([*args, "--source", src, "--cache", tmp_path / "c", "--workers", 0])
        assert r.exit_code == 1 and "Traceback" not in r.output, (args, r.output)
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, r.output)
        assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------- cache info
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("info")
    src = make_imagefolder(d / "imgs", classes=("a", "b"), per_class=5)  # N=10, shards of 4 -> 3
    c = d / "cache"
    base = ["--source", src, "--cache", c, "--resolution", RES, "--shard-size", 4, "--workers", 0]
    ok(["encode-latents", *base, "--vae", "pixel"])
    ok(["encode-latents", *base, "--vae", "tiny", "--dtype", "float16"])
    ok(["encode-features", *base, "--encoder", "tiny", "--grid", 2])
    torch.set_num_threads(threads)
    return c


def _human(n: int) -> str:
    return f"{n} B" if n < 1000 else f"{n / 1000:.1f} KB" if n < 1e6 else f"{n / 1e6:.1f} MB"


EXPECTED = {  # name: (shape, dtype, itemsize, random init)
    "latents/pixel": ((10, 6, RES, RES), "float32", 4, False),
    "latents/tiny": ((10, 8, 4, 4), "float16", 2, True),
    "features/tiny": ((10, 4, 64), "float16", 2, True),
}


def test_cache_info_shows_arrays_progress_and_provenance(cache):
    r = ok(["cache", "info", cache])
    out = r.stdout
    src = cache.parent / "imgs"
    assert str(src) in out and "N=10" in out and "16px" in out and "imagefolder" in out
    keys, _ = imagefolder_index(src)
    import hashlib
    assert hashlib.sha256("".join(k + "\n" for k in keys).encode()).hexdigest()[:12] in out  # file-list hash
    for name, (shape, dtype, itemsize, random_init) in EXPECTED.items():
        row = next((line for line in out.splitlines() if re.search(rf"\b{re.escape(name)}\b", line)
                    and "x".join(map(str, shape)) in line), None)
        assert row is not None, f"no table row for {name}:\n{out}"
        nbytes = int(np.prod(shape)) * itemsize
        assert nbytes == read_array(cache, name).nbytes
        for cell in (dtype, _human(nbytes), "3/3", "complete"):
            assert cell in row, (name, cell, row)
        model_line = next(line for line in out.splitlines() if line.startswith(f"{name}: model"))
        assert ("random init" in model_line) == random_init, model_line
    m = json.loads((cache / "manifest.json").read_text())
    assert m["arrays"]["features/tiny"]["spec"]["model"]["weights_hash"] in out


def test_cache_info_json_parses_and_matches_the_cache(cache):
    info = json.loads(ok(["cache", "info", cache, "--json"]).stdout)
    assert info["dataset"]["n"] == 10 and info["num_shards"] == 3 and info["shard_size"] == 4
    arrays = {a["name"]: a for a in info["arrays"]}
    assert set(arrays) == set(EXPECTED)
    for name, (shape, dtype, itemsize, random_init) in EXPECTED.items():
        a = arrays[name]
        assert tuple(a["shape"]) == shape and a["dtype"] == dtype
        assert a["bytes"] == int(np.prod(shape)) * itemsize
        assert (a["shards_done"], a["num_shards"], a["status"], a["bad"]) == (3, 3, "complete", 0)
        assert a["model"]["random_init"] is random_init


def test_cache_verify_detects_a_changed_shard(cache, tmp_path):
    import shutil

    ok(["cache", "verify", cache])
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    shard = copy / "cache.zarr" / "features" / "tiny" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = invoke(["cache", "verify", copy])
    assert r.exit_code == 1 and "features/tiny: shard 1: checksum mismatch in 1 row(s) [4]" in r.output, r.output
