"""Torch CPU threads on an idle and on a busy machine: the quick start, shortened, with --threads 1 and with
torch's default (one per core), while 0, 1 or 2 other processes keep a core busy each (a laptop doing
something else). Prints wall seconds and env steps/s per cell, as a markdown table.
Usage: python -m benchmarks.threads [--total-timesteps 512] [--busy 0 1 2] [--threads 1 2]"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY_LOOP = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass"  # one core, bounded

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--total-timesteps", type=int, default=512, help="env steps per run (128 per iteration)")
parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="other processes spinning, one core each")
parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()], help="torch threads to compare")
parser.add_argument("--env-id", default="gym_cards/NumberLine-v0", help="the env vldac.py trains on")
a = parser.parse_args()

rows = []
for busy in a.busy:
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        for threads in a.threads:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            command = [sys.executable, str(ROOT / "vldac.py"), "--env-id", a.env_id, "--total-timesteps",
                       str(a.total_timesteps), "--threads", str(threads), "--no-save-model", "--checkpoint-every", "0"]
            start = time.time()
            with tempfile.TemporaryDirectory() as cwd:
                out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
            wall = time.time() - start
            sps = re.findall(r"SPS ([\d.]+)", out.stdout)
            rows.append((busy, threads, wall, float(sps[-1]) if sps else float("nan"), out.returncode))
            print(f"busy {busy}, threads {threads}: {wall:.0f} s wall, {rows[-1][3]:.1f} env steps/s, "
                  f"exit {out.returncode}", flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()

print(f"\n{os.cpu_count()} cores; {a.total_timesteps} env steps of `vldac.py --env-id {a.env_id}` per run\n")
print("| other busy processes | torch threads | wall | env steps/s |\n|---|---|---|---|")
for busy, threads, wall, sps, code in rows:
    print(f"| {busy} | {threads} | {wall:.0f} s | {sps:.1f} |" + ("" if code == 0 else f" exit {code} |"))
