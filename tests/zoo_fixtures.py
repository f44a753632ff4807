"""A tiny CLIP zoo shared by the zoo and bench tests (seconds to build).

Import the fixture into a test module with ``from zoo_fixtures import tiny_zoo``.
"""

import pytest

TINY = {
    "kind": "clip",
    "n_train": 64,
    "n_test": 40,
    "n_calib": 8,
    "hidden_size": 32,
    "num_layers": 1,
    "batch_size": 16,
    "pretrain_steps": 4,
    "expert_steps": 3,
}


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A tiny merge-aware BadNets CLIP zoo (4 tasks, digits backdoored)."""
    import torch

    from dam_mergekit.lab.zoo.build import build_zoo

    torch.set_num_threads(1)
    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", TINY)
