"""A virtual environment of its own for Flower, made on demand.

Flower 1.42 wants Keras 3, a newer TensorFlow and numpy 2, none of which fit beside
edgefl's pinned TensorFlow 2.14/TFF; so the Flower side of the benchmark
(``benchmarks/flower_fleet.py``) runs in a separate interpreter, and this module (standard
library only, imported from edgefl's venv) makes that interpreter. The requirement list
is written to a marker file inside the venv once pip has succeeded, so a second call
with the same list costs one file read, and a changed list (or a half-made venv)
installs again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# tensorflow-cpu 2.21 is what `pip install --dry-run "flwr[simulation]==1.42.*" tensorflow-cpu`
# resolves to on Python 3.11 (with ray 2.55 and numpy 2.4); pinned so reruns compare like with like.
FLOWER_REQUIREMENTS = ["flwr[simulation]==1.42.*", "tensorflow-cpu==2.21.*"]

DEFAULT_VENV = Path(__file__).resolve().parent.parent / ".flower-venv"
MARKER = ".requirements"


def _ignore_in_git(venv_dir: Path) -> None:
    """What Python 3.13's venv does by itself: a ``*`` .gitignore inside the venv keeps it
    out of ``git status`` and ``git add -A`` in the repository it sits in."""
    gitignore = venv_dir / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# Created by benchmarks/flower_env.py: the venv is never committed\n*\n")


def flower_python(venv_dir: Path = DEFAULT_VENV) -> Path:
    """The Flower venv's interpreter, creating the venv and installing
    ``FLOWER_REQUIREMENTS`` first unless the marker says they are already there."""
    venv_dir = Path(venv_dir)
    python = venv_dir / "bin" / "python"
    marker = venv_dir / MARKER
    wanted = "\n".join(FLOWER_REQUIREMENTS) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        _ignore_in_git(venv_dir)
        return python
    if not python.exists():
        print(f"flower venv: creating {venv_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    _ignore_in_git(venv_dir)
    # Dropped first: an interrupted install must not be mistaken for a finished one.
    marker.unlink(missing_ok=True)
    print(f"flower venv: pip install {' '.join(FLOWER_REQUIREMENTS)} (takes minutes)", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    # pip's own progress is left on; its lines are the progress a caller sees meanwhile.
    subprocess.run([str(python), "-m", "pip", "install", "--progress-bar", "off", *FLOWER_REQUIREMENTS], check=True)
    marker.write_text(wanted)
    print(f"flower venv: ready at {python}", flush=True)
    return python


if __name__ == "__main__":
    print(flower_python(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_VENV))
