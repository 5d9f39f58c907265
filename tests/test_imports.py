"""Every module of the three packages imports on its own, as a program's first import: the
jaxinfer <-> partitioning import cycle never leaves a module half-initialized."""

import subprocess
import sys

# In a fresh interpreter: for each module, drop every module of the packages, import that one.
CHECK = """
import importlib, pkgutil, sys
import flax, jax, numpy  # third-party modules stay loaded between the imports below
PACKAGES = ("jaxinfer", "partitioning", "pallas_kernels")
names = []
for pkg in PACKAGES:
    path = importlib.import_module(pkg).__path__
    names += [pkg] + [m.name for m in pkgutil.walk_packages(path, pkg + ".")
                      if not m.name.endswith("__main__")]
failed = []
for name in names:
    for loaded in [k for k in sys.modules if k.split(".")[0] in PACKAGES]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as err:
        failed.append(f"{name}: {err}")
print(len(names))
print("\\n".join(failed))
"""


def test_every_module_imports_first():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    count, *failed = out.stdout.strip().split("\n")
    assert int(count) > 50  # the walk found the packages' modules
    assert failed == [], "\n".join(failed)
