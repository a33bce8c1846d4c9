"""Summarise vldac.py stdout logs: first iteration whose success rate, averaged with the next two
iterations, reaches 0.9; that point's env steps and wall time; and the final-quarter mean success."""
import argparse
import re

parser = argparse.ArgumentParser(description=__doc__.replace("\n", " "))
parser.add_argument("logs", nargs="+", help="vldac.py stdout files (quickstart.sh writes runs/quickstart/seed*.log)")
for path in parser.parse_args().logs:
    rows = [(int(m[1]), float(m[2]), float(m[3])) for m in
            re.finditer(r"steps (\d+) SPS ([\d.]+) \| success ([\d.na]+)", open(path).read()) if m[3] != "nan"]
    steps, sps, success = zip(*[(s, p, float(x)) for s, p, x in rows]) if rows else ((), (), ())
    hit = next((i for i in range(len(success) - 2) if sum(success[i : i + 3]) / 3 >= 0.9), None)
    tail = success[len(success) * 3 // 4 :]
    where = f"{steps[hit]} env steps, {steps[hit] / sps[hit]:.0f} s" if hit is not None else "never"
    print(f"{path}: success >= 0.9 (3-iteration mean) at {where}; first 4 iterations {sum(success[:4]) / 4:.2f}; "
          f"final-quarter mean {sum(tail) / max(1, len(tail)):.2f}; {steps[-1]} env steps at {sps[-1]:.1f} SPS")
