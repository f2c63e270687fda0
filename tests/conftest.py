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


# .ci/run runs the tests on two pytest-xdist workers with whole files to one worker (--dist loadfile: a module's
# fixture, such as test_pipeline's full run, is built once). The files with the longest tests (the LlamaGen-B
# rehearsal, the tiny-teacher retrain, the pipeline runs) go first, so that the two workers end together; the rest
# keep their order.
SLOWEST_FILES_FIRST = ("test_rehearsal.py", "test_tiny_teachers.py", "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="session")
def _deterministic_torch():
    import torch
    torch.set_num_threads(1)  # 2 shared cores: oversubscription makes tests 20-100x slower
    yield
