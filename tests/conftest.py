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
