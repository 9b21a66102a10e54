"""The config walk: the modules a command's config passes through, from the stage to the step.

    python bench/walk.py            # prints the train and sample-eval walks

A *move* is a call into a repa_pipe function that takes the command's config object (an instance of its config
dataclass, or an object carrying it as `.cfg`, e.g. training's Plan) as an argument, made from another module than the previous such call's (calls within one module are
one stay). A *climb* is a move to a module of a higher layer (docs/CONTRACTS.md: cli > stages > encoding,
training, sampling, analysis, demo > pipeline, cache, models, metrics). Train's walk runs from `stages/train.py`
to the first `training/step.py: micro_loss`; sample-eval's from `stages/sample_eval.py` to its first sampler call
(`models/samplers.py`), on a tiny run (SiT-T/2, 8 rows of pixel latents, 2 steps).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from train_fixtures import make_cache  # noqa: E402

LAYER = {"cli": 0, "stages": 1, "encoding": 2, "training": 2, "sampling": 2, "analysis": 2, "demo": 2,
         "pipeline": 3, "cache": 3, "models": 3, "metrics": 3}


def module_of(code: Any) -> str | None:
    """'training/state.py' for a frame's code object inside repa_pipe, else None."""
    p = Path(code.co_filename).resolve()
    try:
        return str(p.relative_to(ROOT / "repa_pipe"))
    except ValueError:
        return None


def walk(fn: Callable[[], None], cfg_type: type, stop: Callable[[str, str], bool]) -> list[str]:
    """Modules of the calls, in order, whose arguments include a `cfg_type` instance (or carry one as `.cfg`), until
    `stop(module, name)`."""
    seq: list[str] = []
    done = [False]

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event != "call" or done[0]:
            return
        mod = module_of(frame.f_code)
        if mod is None:
            return
        if stop(mod, frame.f_code.co_name):
            done[0] = True
            seq.append(mod)
            return
        n = frame.f_code.co_argcount + frame.f_code.co_kwonlyargcount
        args = [frame.f_locals.get(name) for name in frame.f_code.co_varnames[:n]]
        if any(isinstance(a, cfg_type) or isinstance(getattr(a, "cfg", None), cfg_type) for a in args):
            seq.append(mod)

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seq


def summary(seq: list[str]) -> tuple[int, int, list[str]]:
    """(moves, climbs, the path with repeated stays folded)."""
    path = [m for i, m in enumerate(seq) if i == 0 or m != seq[i - 1]]
    layer = lambda m: LAYER[m.split("/")[0]] if "/" in m else 0  # noqa: E731
    climbs = sum(layer(b) < layer(a) for a, b in zip(path, path[1:]))
    return len(path) - 1, climbs, path


def main() -> None:
    torch.set_num_threads(1)
    from repa_pipe.sampling.config import SampleEvalConfig
    from repa_pipe.stages import sample_eval, train
    from repa_pipe.training.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        cache, run = make_cache(Path(tmp) / "c"), Path(tmp) / "run"
        tcfg = TrainConfig(cache=cache, run_dir=run, model="SiT-T/2", encoder=("dinov2-b",), encoder_depth=2,
                           projector_dim=16, global_batch_size=8, steps=1, log_every=1, sample_every=0,
                           precision="fp32", loader_threads=1)
        seq = walk(lambda: train.run(tcfg), TrainConfig, lambda m, f: m == "training/step.py" and f == "micro_loss")
        report("train", seq)
        scfg = SampleEvalConfig(out=Path(tmp) / "out", run_dir=run, num_samples=2, num_steps=2, batch_size=2,
                                shard_size=2)
        seq = walk(lambda: sample_eval.run(scfg), SampleEvalConfig, lambda m, f: m == "models/samplers.py")
        report("sample-eval", seq)


def report(name: str, seq: list[str]) -> None:
    moves, climbs, path = summary(seq)
    print(f"{name}: {moves} moves, {climbs} climbs: {' -> '.join(path)}")


if __name__ == "__main__":
    main()
