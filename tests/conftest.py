import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout holds the paper and the golden files; a user's clone has none.
SHARED = Path(os.environ.get("DD_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"


def golden_dir(family: str) -> Path:
    """The golden folder of a family. Missing in a user's clone: the test skips, saying why. Missing in CI
    (``CI=true``), where ../shared is provided: a failure, so that a CI run that lost it cannot stay green."""
    d = GOLDEN / family
    if not d.is_dir():
        why = f"golden data not available: {d} does not exist (only present beside the dev checkout)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}; CI=true, where it must be present", pytrace=False)
        pytest.skip(why)
    return d


@pytest.fixture(autouse=True, scope="session")
def _deterministic_torch():
    import torch
    torch.set_num_threads(1)  # 2 shared cores: oversubscription makes tests 20-100x slower
    yield
