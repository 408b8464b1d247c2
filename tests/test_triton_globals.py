"""What the Triton compiler demands of a kernel's globals, checked on the CPU.

The interpreter (CI's lane) runs kernels as Python and lets them read any global; the
compiler on a GPU accepts only globals made with ``tl.constexpr(...)`` (and modules and
other ``@triton.jit`` functions). A plain float constant used inside a kernel therefore
passes every CPU test and fails every GPU one: this test reads each kernel's code instead.
"""

import builtins
import dis
import importlib
import inspect
import pkgutil
import types

import pytest
import triton
import triton.language as tl

import mac_triton

pytestmark = pytest.mark.interpreter
# @triton.jit makes a JITFunction, or under TRITON_INTERPRET=1 an InterpretedFunction
KERNELS = tuple(t for t in (getattr(triton.runtime.jit, "JITFunction", None), getattr(getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None)) if t)


def jit_functions():
    for info in pkgutil.iter_modules(mac_triton.__path__):
        module = importlib.import_module(f"mac_triton.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, KERNELS) and obj.fn.__module__ == module.__name__:
                yield f"{module.__name__}.{name}", obj.fn


def global_names(fn) -> set[str]:
    return {ins.argval for ins in dis.get_instructions(fn) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}


@pytest.mark.parametrize("name, fn", list(jit_functions()), ids=lambda x: x if isinstance(x, str) else "")
def test_kernel_globals_are_constexpr(name, fn):
    bad = []
    for glob in global_names(fn):
        if hasattr(builtins, glob) and glob not in fn.__globals__:
            continue  # float, range, min, ...: the compiler knows those
        value = fn.__globals__.get(glob)
        if isinstance(value, (tl.constexpr, types.ModuleType, *KERNELS)):
            continue
        bad.append(f"{glob} ({type(value).__name__})")
    assert not bad, f"{name} reads non-constexpr globals: {', '.join(bad)}"


def test_every_module_was_scanned():
    names = {name.rsplit(".", 1)[0] for name, _ in jit_functions()}
    assert {"mac_triton.attend", "mac_triton.reduce", "mac_triton.decide", "mac_triton.match", "mac_triton.plan", "mac_triton.numerics"} <= names
    assert inspect.isfunction(next(iter(jit_functions()))[1])
