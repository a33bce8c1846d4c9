"""pytest hook for test_vldac.py: the longest test first, so that `pytest -n 2` runs the others beside it."""
LONGEST = "test_quickstart_learns_numberline"  # a 4,608-env-step training run


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.name != LONGEST)  # stable: file order otherwise
