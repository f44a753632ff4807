"""The calibration's two seams: every state has the state protocol's methods with the same
parameters, every objective the objective protocol's, and the loop never asks for the mode."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from dam_mergekit.calibrate import objectives, state
from dam_mergekit.calibrate.sharded import ShardedState


def _methods(protocol) -> list[str]:
    return [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]


def _parameters(func) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(func).parameters.values()]


@pytest.mark.parametrize("implementation", [state.LocalState, ShardedState])
def test_states_have_the_protocols_methods(implementation):
    methods = _methods(state.CalibrationState)
    assert {"draw", "merged_params", "gradients", "final_tensors"} <= set(methods)
    for name in methods:
        expected = _parameters(getattr(state.CalibrationState, name))
        assert _parameters(getattr(implementation, name)) == expected, name


@pytest.mark.parametrize("mode", sorted(objectives.OBJECTIVES))
def test_objectives_have_the_protocols_methods(mode):
    implementation = objectives.OBJECTIVES[mode]
    for name in _methods(objectives.Objective):
        expected = _parameters(getattr(objectives.Objective, name))
        assert _parameters(getattr(implementation, name)) == expected, (mode, name)
    for attribute in ("extraction", "two_masks", "bounded_perturbation"):
        assert hasattr(implementation, attribute), (mode, attribute)


def test_the_loop_never_reads_the_mode():
    """Only the objective knows the algorithm: trainer.py reads no ``mode`` and no ``dual``."""
    source = Path(objectives.__file__).with_name("trainer.py").read_text(encoding="utf-8")
    read = {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr in ("mode", "dual")
    }
    assert read == set()
