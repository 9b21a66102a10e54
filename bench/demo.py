"""The README's demo command, timed and scored: `repa-pipe demo OUT` on a fresh OUT, as a new user runs it.

    python bench/demo.py             # 2 runs of the exact README command; updates docs/benchmarks.md and the
                                     # README's pictures (docs/demo_grid.png, docs/demo_loss.png) from the first
    python bench/demo.py --quick     # 1 run with --steps 200 --encoder-steps 20, prints only

Each run is a separate `repa-pipe demo` process on a fresh folder (nothing reused); the phase times and the
judge's score come from the OUT/demo.json the demo writes, the total from the process's wall clock.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from repa_pipe.stages.demo import PHASES  # noqa: E402

README_COMMAND = ["demo", "OUT"]


def run_demo(out: Path, extra: list[str]) -> dict:
    if out.exists():
        shutil.rmtree(out)
    exe = Path(sys.executable).parent / "repa-pipe"
    t0 = time.perf_counter()
    p = subprocess.run([str(exe), "demo", str(out), *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"demo failed ({p.returncode}):\n{p.stderr[-3000:]}")
    d = json.loads((out / "demo.json").read_text())
    d["wall_seconds"] = round(wall, 1)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_docs_args(ap)
    ap.add_argument("--runs", type=int, default=None, help="repeats of the command (default 2; --quick 1)")
    args = ap.parse_args()
    extra = ["--steps", "200", "--encoder-steps", "20"] if args.quick else []
    runs = args.runs or (1 if args.quick else 2)
    info = C.machine({"command": " ".join(["repa-pipe", *README_COMMAND, *extra])})
    results = []
    for i in range(runs):
        out = C.SCRATCH / f"demo-readme-{i}"
        results.append(run_demo(out, extra))
        r = results[-1]
        print(f"run {i + 1}: {r['wall_seconds']:.0f} s, judge {r['judge']['accuracy']:.3f}, phases {r['seconds']}",
              flush=True)
    info["load_end"] = C.loadavg()
    phases = list(PHASES)  # demo.json's keys are sorted; report them in the order they run
    rows = [[f"run {i + 1}", f"{r['wall_seconds']:.0f}", *[f"{r['seconds'][p]:.0f}" for p in phases],
             f"{r['judge']['accuracy']:.3f}", f"{r['judge']['fd']:.1f}", r["judge"]["num_samples"]]
            for i, r in enumerate(results)]
    table = C.table(["run", "wall s (process)", *[f"{p} s" for p in phases], "judge accuracy", "judge FD",
                     "samples judged"], rows)
    held = results[0]["judge"]["judge_heldout_accuracy"]
    text = f"""## Demo: the README's command, timed and scored

`python bench/demo.py` ({'quick run' if args.quick else 'full run'}). {C.machine_line(info)}

`repa-pipe {' '.join(README_COMMAND + extra)}` on a fresh folder, {runs} time(s), each a separate process. Judge
accuracy = share of the class-balanced samples that the judge (an MLP trained on 80% of the real digits; {held:.3f}
on the other 20%) classifies as the digit they were drawn for; chance is 0.1. Judge FD = Frechet distance to the
real digits in the judge's hidden layer (small-sample, for large effects only).

{table}
"""
    print(text)
    if C.should_write_docs(args):
        C.update_section("demo", text)
        first = C.SCRATCH / "demo-readme-0"
        shutil.copy(first / "samples" / "grid.png", C.REPO / "docs" / "demo_grid.png")
        shutil.copy(first / "run" / "loss.png", C.REPO / "docs" / "demo_loss.png")
        print("updated docs/demo_grid.png and docs/demo_loss.png")


if __name__ == "__main__":
    main()
