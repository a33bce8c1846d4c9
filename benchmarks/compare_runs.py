"""Are two vldac.py runs the same? Compares every TensorBoard scalar of two run directories except charts/SPS (wall
clock), and the files their --trajectories-every wrote (JSONL and frame PNGs), byte for byte. How a refactor is shown
to change nothing that is logged: the same command, before and after, then
    python -m benchmarks.compare_runs runs/BEFORE runs/AFTER"""
import argparse
import filecmp
import sys
from pathlib import Path


def scalars(run_dir):
    """{tag: [(step, value), ...]} of every scalar but charts/SPS."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag != "charts/SPS"}


def differing_files(a, b):
    """Relative paths under a or b that are missing from the other or differ in content."""
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {p.relative_to(b) for p in b.rglob("*")
                                                                        if p.is_file()}
    return sorted(str(f) for f in files if not ((a / f).is_file() and (b / f).is_file()
                                                and filecmp.cmp(a / f, b / f, shallow=False)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2, type=Path, help="two run directories (runs/NAME)")
    a, b = parser.parse_args().runs
    left, right = scalars(a), scalars(b)
    differ = sorted(tag for tag in left.keys() | right.keys() if left.get(tag) != right.get(tag))
    files = differing_files(a / "trajectories", b / "trajectories") if (a / "trajectories").is_dir() else []
    print(f"{len(left)} tags, {sum(map(len, left.values()))} values; differing tags: {differ or 'none'}; "
          f"trajectory files differing: {files or 'none'}")
    sys.exit(1 if differ or files else 0)


if __name__ == "__main__":
    main()
