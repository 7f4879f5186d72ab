"""Optional heavy dependencies, imported only by the code paths that need them.

The pack must load inside ComfyUI without faiss or dreamsim; a node that needs one raises an error
that names the missing package and the command that installs it.
"""

import importlib
import importlib.util

INSTALL_HINTS = {
    "faiss": "pip install faiss-cpu",
    "dreamsim": "pip install dreamsim==0.2.1",
    "matplotlib": "pip install matplotlib",
    "redis": "pip install redis",
}


class MissingDependencyError(ImportError):
    pass


def is_available(module_name: str) -> bool:
    return importlib.util.find_spec(module_name) is not None


def require(module_name: str, needed_for: str):
    """Import an optional module or raise an error that says what to install."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        hint = INSTALL_HINTS.get(module_name, f"pip install {module_name}")
        raise MissingDependencyError(
            f"{needed_for} needs the Python package '{module_name}', which could not be imported "
            f"({error}). Install it into ComfyUI's Python environment with `{hint}` "
            f"(or `pip install -r requirements.txt` in the Shield pack folder) and restart ComfyUI."
        ) from error
