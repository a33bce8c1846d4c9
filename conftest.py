"""pytest hooks for test_vldac.py: the tiny models build in the background while the tests that need none run.

Building the tiny models (one per family of envs, tiny_vlm.FAMILIES) is most of the suite's CPU time when the cache
is empty, as in CI. Waiting for each build in the fixture that first needs it leaves a core idle for minutes;
instead every build the selected tests need starts as soon as they are collected, two at a time, each in a
one-thread process (the same model, bit for bit, as `OMP_NUM_THREADS=1 python tiny_vlm.py`), NumberLine's first.
The tests that need a built model run last (NumberLine's model before the others), so the rest run meanwhile.
"""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import tiny_vlm

HERE = Path(__file__).resolve().parent
# fixture of test_vldac.py -> the tiny model families it loads
MODEL_FIXTURES = {"tiny_pretrained": ["numberline"],
                  "tiny_families": [name for name in tiny_vlm.FAMILIES if name != "numberline"]}
_builds = {}  # family -> Future of its build
_running = {}  # family -> its build's process, while it runs


def _build(name):
    """Build family `name`'s model into the cache in a one-thread child process (nothing if it is cached)."""
    code = f"import tiny_vlm; tiny_vlm.tiny_model_path(tiny_vlm.FAMILIES[{name!r}], progress=False)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    _running[name] = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
    stderr = _running[name].communicate()[1]
    if _running.pop(name).returncode:
        raise RuntimeError(f"building the tiny {name} model failed:\n{stderr[-3000:]}")


def _rank(item):
    """0: needs no built model, 1: NumberLine's, 2: another family's (pytest's sort is stable)."""
    names = [n for fixture, families in MODEL_FIXTURES.items() if fixture in item.fixturenames for n in families]
    return 0 if not names else 1 if names == ["numberline"] else 2


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(items):
    items.sort(key=_rank)


def pytest_collection_finish(session):
    needed = {n for item in session.items for fixture, families in MODEL_FIXTURES.items()
              if fixture in item.fixturenames for n in families}
    # longest first after NumberLine, so that the two lanes end close together
    order = sorted(needed, key=lambda n: (n != "numberline", -tiny_vlm.FAMILIES[n].pretrain_steps))
    missing = [n for n in order if not (tiny_vlm.cache_path(tiny_vlm.FAMILIES[n]) / "tiny_vlm.json").exists()]
    if missing:
        pool = ThreadPoolExecutor(2)
        _builds.update({name: pool.submit(_build, name) for name in missing})
        pool.shutdown(wait=False)


def pytest_sessionfinish(session):
    """A run stopped early (-x, Ctrl-C) does not wait for builds nobody needs any more (a killed build leaves no
    half model in the cache: tiny_vlm builds into a temporary directory)."""
    for future in _builds.values():
        future.cancel()
    for process in list(_running.values()):
        process.kill()


@pytest.fixture(scope="session")
def wait_for_build():
    """wait_for_build(family): block until that family's model is in the cache (re-raising its build's error)."""
    return lambda name: _builds[name].result() if name in _builds else None
