"""``shoal merge --device cuda`` against ``--device cpu`` on the same recipe and inputs.

    python benchmarks/make_checkpoints.py --size 0.5b --out /data/0.5b
    python benchmarks/merge_cuda.py --set /data/0.5b --pairs 2

For each method (the recipes of ``merge_speed.py``), the two devices run alternately as
separate ``shoal merge`` processes; wall time and peak RSS come from ``os.wait4`` (no
``/usr/bin/time`` needed). The outputs of the last pair are compared tensor by tensor: the
share of entries bitwise equal, the share within bf16 tolerance (rtol 1.6e-2), and the
largest difference. Then one merge per method runs in a child process on the GPU to read
``torch.cuda.max_memory_allocated`` and the merge's own time (no interpreter start). This
process never imports torch: a child's peak RSS includes its parent's at the fork. Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import recipe_for, shoal_command  # noqa: E402

METHODS = ("linear", "ties", "dare_ties", "slerp")


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{output[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def compare(cpu_dir: Path, gpu_dir: Path) -> dict[str, float]:
    """Share of entries equal and within bf16 tolerance, and the largest |difference|."""
    import torch

    from shoal.checkpoint import open_checkpoint

    equal = close = total = 0
    worst = 0.0
    with open_checkpoint(cpu_dir) as cpu, open_checkpoint(gpu_dir) as gpu:
        for name in cpu.tensor_names():
            a, b = cpu.get(name).float(), gpu.get(name).float()
            equal += int((a == b).sum())
            close += int(torch.isclose(b, a, rtol=1.6e-2, atol=1e-5).sum())
            total += a.numel()
            worst = max(worst, float((a - b).abs().max()))
    return {"equal": equal / total, "close": close / total, "max_abs": worst}


def gpu_peak(recipe: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, peak GPU memory in MB) of one in-process merge on the GPU."""
    import torch

    from shoal.merge import merge

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    merge(recipe, out, device="cuda", overwrite=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20


def child(args: argparse.Namespace, what: str, *paths: Path):  # type: ignore[no-untyped-def]
    """Run ``compare`` or ``gpu_peak`` in a child process; its JSON result."""
    command = [sys.executable, __file__, "--set", str(args.set), "--child", what, *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, required=True, help="folder with base/, ft_a/, ft_b/")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for outputs")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # compare CPU GPU | peak RECIPE OUT
    args = parser.parse_args()
    if args.child:
        what, *paths = args.child
        result = compare(*map(Path, paths)) if what == "compare" else gpu_peak(*map(Path, paths))
        print(json.dumps(result))
        return
    base, a, b = (args.set / n for n in ("base", "ft_a", "ft_b"))
    work = args.work or args.set / "_cuda"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        recipe = work / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_for(method, base, a, b), sort_keys=False))
        times: dict[str, list[tuple[float, float]]] = {"cpu": [], "cuda": []}
        for pair in range(args.pairs):
            for device in ("cpu", "cuda"):
                out = work / f"out_{device}"
                shutil.rmtree(out, ignore_errors=True)
                times[device].append(timed(shoal_command(recipe, out, ["--device", device])))
                print(f"{method:10s} {device:5s} pair {pair + 1}: {times[device][-1][0]:7.2f} s "
                      f"{times[device][-1][1]:7.0f} MB", file=sys.stderr, flush=True)
        agreement = child(args, "compare", work / "out_cpu", work / "out_cuda")
        in_process, peak = child(args, "peak", recipe, work / "out_inproc")
        shutil.rmtree(work / "out_inproc", ignore_errors=True)
        rows.append((method, *(statistics.median(w for w, _ in times[d]) for d in ("cpu", "cuda")),
                     *(statistics.median(r for _, r in times[d]) for d in ("cpu", "cuda")), in_process, peak,
                     agreement))
    print(f"\nset: {args.set}; CPU cores: {os.cpu_count()}; pairs: {args.pairs}; medians\n")
    print("| method | CPU wall s | CUDA wall s | CPU/CUDA | CPU peak RSS MB | CUDA peak RSS MB | CUDA in-process s | "
          "peak GPU MB | entries equal | within bf16 tol | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method, cw, gw, cr, gr, ip, peak, agree in rows:
        print(f"| {method} | {cw:.2f} | {gw:.2f} | {cw / gw:.2f}x | {cr:.0f} | {gr:.0f} | {ip:.2f} | {peak:.0f} | "
              f"{agree['equal']:.6f} | {agree['close']:.6f} | {agree['max_abs']:.2e} |")


if __name__ == "__main__":
    main()
