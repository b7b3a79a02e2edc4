import os
import sys
from pathlib import Path

import pytest

# Nothing in the tests may reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own imgclf cache and working directory."""
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
