import sys
from pathlib import Path

# tests/ holds helper modules (tiny_models) imported by name.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def wikitext_path():
    from linearize.data import find_wikitext

    return find_wikitext()
