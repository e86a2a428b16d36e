"""nbmake runs each notebook in a real Jupyter kernel: a separate process that must import the package under test.

pytest's ``pythonpath = ["."]`` only changes pytest's own ``sys.path``; the kernel inherits the environment, so the
repository root goes on ``PYTHONPATH`` too (a no-op for an installed checkout, decisive for a second worktree).
"""

import os
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
os.environ.setdefault("WANDB_MODE", "offline")
