"""The demo trained on an int8 feature cache against the same demo on the default float16 one, 3 seeds each.

    python bench/int8_demo.py            # seeds 0, 1, 2; updates docs/benchmarks.md (section int8-demo)
    python bench/int8_demo.py --quick    # seed 0, --steps 200 --encoder-steps 20, prints only

Each run is the demo's own recipe (`repa-pipe demo`, stages/demo.py) in this process, with the one change that its
encode-features config stores `--feature-dtype int8` in the int8 runs. A seed's two runs share its SimCLR encoder
(trained once by the float16 run; the int8 run reuses the file, as a re-run of the demo does), so they differ only
in the stored features. Every seed's score is reported; none is picked.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from repa_pipe.demo.config import DemoConfig  # noqa: E402
from repa_pipe.stages import demo  # noqa: E402


def run(out: Path, seed: int, dtype: str, quick: bool) -> dict:
    orig = demo.stage_configs

    def configs(*a, **k):
        lat, feat, tr, se = orig(*a, **k)
        return lat, dataclasses.replace(feat, feature_dtype=dtype), tr, se

    demo.stage_configs = configs
    try:
        t0 = time.perf_counter()
        demo.run(DemoConfig(out=out, seed=seed, **(dict(steps=200, encoder_steps=20) if quick else {})))
        wall = time.perf_counter() - t0
    finally:
        demo.stage_configs = orig
    d = json.loads((out / "demo.json").read_text())
    return {"accuracy": d["judge"]["accuracy"], "fd": d["judge"]["fd"], "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_docs_args(ap)
    args = ap.parse_args()
    seeds = (0,) if args.quick else (0, 1, 2)
    info = C.machine()
    scratch = Path(tempfile.mkdtemp(prefix="int8_demo_"))
    res: dict[str, dict[int, dict]] = {"float16": {}, "int8": {}}
    try:
        for seed in seeds:
            for dtype in ("float16", "int8"):
                out = scratch / f"{dtype}-{seed}"
                if dtype == "int8":  # the same SimCLR encoder as this seed's float16 run
                    shutil.copytree(scratch / f"float16-{seed}" / "encoder", out / "encoder")
                res[dtype][seed] = run(out, seed, dtype, args.quick)
                print(dtype, seed, res[dtype][seed], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["load_end"] = C.loadavg()
    rows = [[seed, f"{res['float16'][seed]['accuracy']:.3f}", f"{res['int8'][seed]['accuracy']:.3f}",
             f"{res['float16'][seed]['fd']:.1f}", f"{res['int8'][seed]['fd']:.1f}"] for seed in seeds]
    mean = {d: sum(r["accuracy"] for r in res[d].values()) / len(seeds) for d in res}
    rows.append(["mean", f"{mean['float16']:.3f}", f"{mean['int8']:.3f}", "", ""])
    body = (f"## The demo on an int8 feature cache (bench/int8_demo.py)\n\n{C.machine_line(info)}\n\n"
            f"The demo's recipe{' (quick: 200 steps)' if args.quick else ''}, float16 versus int8 stored features, "
            f"the same SimCLR encoder per seed; judge accuracy on the demo's samples (higher is better) and its "
            f"Frechet distance to the real images (lower is better):\n\n"
            + C.table(["seed", "judge accuracy, float16", "judge accuracy, int8", "judge FD, float16",
                       "judge FD, int8"], rows) + "\n")
    print(body)
    if C.should_write_docs(args):
        C.update_section("int8-demo", body)


if __name__ == "__main__":
    main()
