"""pytest hooks for test_vldac.py: the tiny models build in the background while the tests that need none run.

Building the tiny models (one per family of envs, tiny_vlm.FAMILIES) is most of the suite's CPU time when the cache
is empty, as in CI. NumberLine's model, which most tests load, is built first, alone: its recipe builds with two
threads (TinyConfig.build_threads), and two OpenMP threads beside other work wait on each other
(docs/performance.md). The other families' builds (one thread each) then run in the background, two at a time,
while the tests run; the tests that need one of those models run last.
"""
import subprocess
import sys
import threading
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
_stopping = threading.Event()  # set when the session ends: no build starts after that


def _build(name):
    """Build family `name`'s model into the cache in a child process (nothing if it is cached)."""
    code = f"import tiny_vlm; tiny_vlm.tiny_model_path(tiny_vlm.FAMILIES[{name!r}], progress=False)"
    if _stopping.is_set():
        return
    # the build sets its own thread count (TinyConfig.build_threads)
    _running[name] = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
    stderr = _running[name].communicate()[1]
    if _running.pop(name).returncode:
        raise RuntimeError(f"building the tiny {name} model failed:\n{stderr[-3000:]}")


def _families(item):
    return {n for fixture, families in MODEL_FIXTURES.items() if fixture in item.fixturenames for n in families}


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: bool(_families(item) - {"numberline"}))  # stable: file order otherwise


def pytest_collection_finish(session):
    needed = set().union(*map(_families, session.items))
    # longest first, so that the two lanes end close together
    missing = [n for n in sorted(needed, key=lambda n: -tiny_vlm.FAMILIES[n].pretrain_steps)
               if not (tiny_vlm.cache_path(tiny_vlm.FAMILIES[n]) / "tiny_vlm.json").exists()]
    if "numberline" in missing:
        missing.remove("numberline")
        print("\nbuilding the tiny NumberLine model before the tests (about 5 minutes on 2 cores)", flush=True)
        _build("numberline")
    if missing:
        pool = ThreadPoolExecutor(2)
        _builds.update({name: pool.submit(_build, name) for name in missing})
        pool.shutdown(wait=False)


def pytest_sessionfinish(session):
    """A run stopped early (-x, Ctrl-C) does not wait for builds nobody needs any more (a killed build leaves no
    half model in the cache: tiny_vlm builds into a temporary directory)."""
    _stopping.set()
    for future in _builds.values():
        future.cancel()
    for process in list(_running.values()):
        process.kill()


@pytest.fixture(scope="session")
def wait_for_build():
    """wait_for_build(family): block until that family's model is in the cache (re-raising its build's error)."""
    return lambda name: _builds[name].result() if name in _builds else None
