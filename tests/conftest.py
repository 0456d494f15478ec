import sys
from pathlib import Path

# tests/ holds helper modules (tiny_models) imported by name.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def wikitext_path():
    from linearize.data import find_wikitext

    return find_wikitext()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own linearize cache, never the user's."""
    monkeypatch.setenv("LINEARIZE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first: `make test` spreads the suite over processes
    (pytest-xdist), and minutes-long tests started last would leave the other processes idle
    at the end. Stable otherwise, so modules keep their own order."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
