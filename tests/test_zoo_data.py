"""Offline tasks: right shapes and types, deterministic for a seed, labels cover every class."""

import numpy as np
import pytest

from dam_mergekit.lab.zoo.data import TASKS, make_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_shapes_and_determinism(name):
    a = make_task(name, 3, n_train=60, n_test=40, n_calib=20)
    b = make_task(name, 3, n_train=60, n_test=40, n_calib=20)
    c = make_task(name, 4, n_train=60, n_test=40, n_calib=20)
    assert a["train_x"].shape == (60, 3, 32, 32) and a["train_x"].dtype == np.uint8
    assert a["test_x"].shape == (40, 3, 32, 32) and a["calib_x"].shape == (20, 3, 32, 32)
    assert a["test_y"].dtype == np.int64
    for key in a:
        assert np.array_equal(a[key], b[key])
    assert not np.array_equal(a["train_x"], c["train_x"])
    big = make_task(name, 0, n_train=300, n_test=100, n_calib=10)
    assert set(np.unique(big["train_y"])) == set(range(len(TASKS[name].classes)))
