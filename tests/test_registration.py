"""Registration: the start-up hook, the switch, idempotence and the name clash."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dam_mergekit.errors import DamError


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_pth_file_is_installed():
    assert (Path(sysconfig.get_paths()["purelib"]) / "dam_mergekit_autoload.pth").is_file()


def test_hook_is_lazy_and_registers_when_mergekit_loads():
    code = (
        "import sys\n"
        "assert 'dam_mergekit._autoload' in sys.modules, 'hook not installed'\n"
        "assert not {'torch', 'mergekit'} & set(sys.modules), 'start-up imported heavy modules'\n"
        "from mergekit import merge_methods\n"
        "assert merge_methods.get('dam').spec.name == 'dam'\n"
        "assert merge_methods.get('defense_aware_merging').spec.reference_url.endswith('2410.13910')\n"
        "import mergekit.merge, mergekit.scripts.run_yaml as ry\n"
        "assert hasattr(mergekit.merge.run_merge, '__dam_mergekit_guard__')\n"
        "guard = '__dam_mergekit_guard__'\n"
        "assert getattr(ry.run_merge, guard) is getattr(mergekit.merge.run_merge, guard)\n"
        "print('ok')\n"
    )
    proc = run_python(code, DAM_MERGEKIT_AUTOLOAD="1")
    assert proc.stdout.strip() == "ok", proc.stderr


def test_switch_turns_the_hook_off():
    code = (
        "import sys\n"
        "assert 'dam_mergekit' not in sys.modules\n"
        "from mergekit import merge_methods\n"
        "names = {m.spec.name for m in merge_methods.registered_methods()}\n"
        "print('dam' in names)\n"
    )
    proc = run_python(code, DAM_MERGEKIT_AUTOLOAD="0")
    assert proc.stdout.strip() == "False", proc.stderr


def test_registering_twice_is_harmless():
    from mergekit import merge_methods

    from dam_mergekit.method import register_methods

    register_methods()
    first = merge_methods.get("dam")
    register_methods()
    assert merge_methods.get("dam") is first


def test_foreign_dam_points_to_the_alias():
    code = (
        "import torch\n"
        "from mergekit.merge_methods import merge_method, register, get, TensorGroup\n"
        "@merge_method(name='dam')\n"
        "def other(group: TensorGroup) -> torch.Tensor:\n"
        "    return group.tensors[0]\n"
        "register(other)\n"
        "from dam_mergekit.method import register_methods\n"
        "try:\n"
        "    register_methods()\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
        "print(type(get('defense_aware_merging')).__name__)\n"
    )
    proc = run_python(code, DAM_MERGEKIT_AUTOLOAD="0")
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("DamError another merge method is already registered as 'dam'"), proc
    assert "merge_method: defense_aware_merging" in lines[0]
    assert lines[1] == "DamMerge"


def test_cli_reports_errors_in_one_line(capsys, tmp_path):
    from dam_mergekit.cli import main

    assert main(["masks", "inspect", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dam-mergekit: error:") and "mask file not found" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(DamError):
        from dam_mergekit.recipe.load import mask_path_for

        mask_path_for(None, None)


def test_importing_the_kernel_module_first_still_registers_quietly():
    """dam_mergekit.method imports mergekit, which fires the hook mid-import: no warning, dam on."""
    code = (
        "import dam_mergekit.method\n"
        "from mergekit import merge_methods\n"
        "print(merge_methods.get('dam').spec.name)\n"
    )
    proc = run_python(code, DAM_MERGEKIT_AUTOLOAD="1")
    assert proc.stdout.strip() == "dam", proc.stderr
    assert "could not hook" not in proc.stderr
