"""Shared fixtures: the real COCO photos in ../shared/data, and a tiny shapes set made once per run."""
import os

import pytest

import data as D

SHARED = os.environ.get("RETINANET_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def shared_path(*parts):
    """A path under the shared data folder; skips the test when it is absent, fails when CI is set."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        message = f"{path} not found (set RETINANET_SHARED_DATA to the shared data folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """8 train and 4 val shapes images of 96 px."""
    return D.make_shapes(str(tmp_path_factory.mktemp("shapes")), num_train=8, num_val=4, size=96, seed=1)
