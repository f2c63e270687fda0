import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout holds the paper and the golden files; a user's clone has none.
SHARED = Path(os.environ.get("DD_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"


def golden_dir(family: str) -> Path:
    d = GOLDEN / family
    if not d.is_dir():
        pytest.skip(f"golden data not available: {d} does not exist (only present beside the dev checkout)")
    return d


@pytest.fixture(autouse=True, scope="session")
def _deterministic_torch():
    import torch
    torch.set_num_threads(1)  # 2 shared cores: oversubscription makes tests 20-100x slower
    yield
