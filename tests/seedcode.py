"""Loads the seed document's Python classes at run time, straight from the document.

The contract promises that programs written against the seed's classes keep working beside the
gateway, so tests run those very classes. The project never holds a copy of the seed's code:
only this loader, which reads the shared document wherever it lives.
"""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

from servers import skip_or_fail

SEED_NAME = "000_e53ab93c4a8e6ba3.txt"
DEFAULT_SEED_PATH = Path(__file__).resolve().parents[2] / "shared" / "seed" / SEED_NAME
MODULE_NAME = "seed_document"
# A fence opening with exactly ```python at the start of a line, up to the next closing fence.
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def seed_path() -> Path:
    override = os.environ.get("GATEWAY_SEED_DOC")
    return Path(override) if override else DEFAULT_SEED_PATH


def python_blocks(text: str) -> list[str]:
    return PYTHON_BLOCK.findall(text)


def load_seed() -> types.SimpleNamespace:
    """Exec every ```python block, in order, in one namespace, and return that namespace.

    The blocks run as a registered module so dataclasses and enums resolve their module as they
    would when imported normally.
    """
    path = seed_path()
    if not path.is_file():
        skip_or_fail(
            f'"How to Implement Device State Management with Redis" not found at {path}: '
            "its classes are what the compatibility tests run (set GATEWAY_SEED_DOC to its path)"
        )
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    if not blocks:
        raise AssertionError(f"seed document {path} holds no ```python blocks")
    module = types.ModuleType(MODULE_NAME, f"Python blocks of {path}")
    module.__file__ = str(path)
    sys.modules[MODULE_NAME] = module
    for index, block in enumerate(blocks):
        exec(compile(block, f"{path}#python-block-{index}", "exec"), module.__dict__)
    public = {name: value for name, value in vars(module).items() if not name.startswith("__")}
    return types.SimpleNamespace(**public)
