"""The packages' public shape: the step's contract in one place, stages reachable by name.

- ``mac_ref`` and ``mac_triton`` re-export ``mac_core``'s contract (one class, not copies);
- no submodule of either is shadowed by a function of its name (``mac_ref.match`` is the module);
- importing ``mac_triton`` imports none of ``mac_ref``'s algorithm (it shares only ``mac_core``).
"""

import importlib
import pkgutil
import subprocess
import sys
import types

import pytest

import mac_core
import mac_ref


@pytest.mark.parametrize("package", ["mac_ref", "mac_triton", "mac_core", "mac_llm"])
def test_no_submodule_is_shadowed(package):
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if info.name == "__main__":
            continue  # (running it is the command line)
        importlib.import_module(f"{package}.{info.name}")
        assert isinstance(getattr(module, info.name), types.ModuleType), f"{package}.{info.name} is not the module"


def test_one_contract_for_both_backends():
    import mac_triton

    for name in ("MACConfig", "LayerState", "StepStats", "Summary", "MatchResult", "Spans"):
        assert getattr(mac_ref, name) is getattr(mac_core, name)
    assert mac_triton.MACConfig is mac_core.MACConfig


def test_mac_triton_does_not_import_the_reference():
    code = "import sys, mac_triton; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mac_ref'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": "."})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", run.stdout
