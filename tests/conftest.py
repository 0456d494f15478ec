import sys
from pathlib import Path

# tests/ holds helper modules (tiny_models) imported by name.
sys.path.insert(0, str(Path(__file__).parent))
