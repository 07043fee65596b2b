"""The repository root is not the place to import this project from: the build installs the folders
kernels/ and models/ as ``pagemem.kernels`` and ``pagemem.models`` (pyproject.toml) and nothing
under a top-level name of its own. ``python -m pytest`` (and pytest itself, for this file) puts the
root first on ``sys.path``, where the folder kernels/ would shadow Hugging Face's ``kernels``
package, which transformers imports. Move the root to the end of ``sys.path``: installed packages
are found first, and ``pagemem`` still resolves to this checkout in an editable install."""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
_here = [p for p in sys.path if os.path.abspath(p or os.curdir) == _ROOT]
sys.path[:] = [p for p in sys.path if p not in _here] + _here[:1]
