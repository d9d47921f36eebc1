"""Shared test helpers: import part files by name, run their main() in a temp folder."""
import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PART_FILES = sorted(p for p in ROOT.glob("part[0-9][0-9]_*.py"))
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


def part_names(first=0):
    """Module names of every part numbered `first` or later (for inherited ideas)."""
    return [p.stem for p in PART_FILES if int(p.stem[4:6]) >= first]


def load(name):
    """Import a part by module name ('part02_train') or number prefix ('part02')."""
    if re.fullmatch(r"part\d\d", name):
        matches = [p.stem for p in PART_FILES if p.stem.startswith(name + "_")]
        assert matches, f"no file for {name}"
        name = matches[0]
    return importlib.import_module(name)


@pytest.fixture
def shakespeare():
    assert SHAKESPEARE.exists(), f"test data missing: {SHAKESPEARE}"
    return str(SHAKESPEARE)


def read_summary(out_dir):
    return json.loads((Path(out_dir) / "summary.json").read_text())
