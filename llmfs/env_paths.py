"""The project's path-valued environment variables, read one way everywhere.

`LLMFS_OUTPUT_DIR`, `LLMFS_DATA_MIRROR` and `LLMFS_CACHE_DIR` name folders. A relative path would
name a different folder in each working directory: the commands start in the repository root, a
notebook's kernel in its chapter's folder, so `LLMFS_DATA_MIRROR=data` would pass
`setup/check_env.py` and then fail in a notebook. `env_path` therefore refuses a relative path
(`InvalidInput`, whose message shows the absolute path it stood for here), and expands `~`.

Kept free of torch, so that `llmfs.download` stays cheap to import and `setup/check_env.py` can
check the variables where PyTorch is missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from llmfs.errors import InvalidInput

OUTPUT_ENV = "LLMFS_OUTPUT_DIR"
MIRROR_ENV = "LLMFS_DATA_MIRROR"
CACHE_ENV = "LLMFS_CACHE_DIR"
# Every LLMFS_ variable that names a folder (llmfs.runtime.environment_variables() lists them all).
PATH_VARIABLES = (OUTPUT_ENV, MIRROR_ENV, CACHE_ENV)


def env_path(name: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """The absolute folder the variable `name` holds (`~` expanded), or None when it is unset or blank.

    Raises InvalidInput for a relative path, naming the absolute path it would be from the current folder.
    """
    value = (os.environ if environ is None else environ).get(name, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise InvalidInput(f"{name}={value} is a relative path, which names another folder in each working "
                           f"directory (a notebook starts in its chapter's folder); give an absolute path, "
                           f"e.g. {name}={Path.cwd() / path}")
    return path


def check_path_variables(environ: Mapping[str, str] | None = None) -> None:
    """Raise InvalidInput for the first path-valued variable that holds a relative path."""
    for name in PATH_VARIABLES:
        env_path(name, environ)
