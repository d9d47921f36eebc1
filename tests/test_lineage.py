"""The shape of the curriculum: every part runs --help, imports nothing outside the list,
and keeps every top-level name of the part before it unless it says `Replaces:`."""
import ast
import dataclasses
import re
import subprocess
import sys

import pytest

from conftest import PART_FILES, ROOT, load

ALLOWED = {"torch", "numpy", "regex", "requests"}
OPTIONAL = {"matplotlib", "tensorboard"}  # requirements-extra.txt: only inside try/except ImportError
PART_RE = re.compile(r"^part\d\d_")


def top_level_names(tree):
    return {n.name for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def replaced(doc):
    names = set()
    for line in (doc or "").splitlines():
        m = re.match(r"\s*Replaces:\s*(.*)", line)
        if m:
            names.update(n for n in re.split(r"[,\s]+", m.group(1)) if n)
    return names


def test_parts_exist():
    assert PART_FILES and PART_FILES[0].name == "part00_foundations.py"
    numbers = [int(p.name[4:6]) for p in PART_FILES]
    assert numbers == list(range(len(numbers))), "parts must be numbered without gaps"


@pytest.mark.parametrize("path", PART_FILES, ids=lambda p: p.stem)
def test_help_lists_every_field(path):
    r = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg_cls = load(path.stem).Config
    for f in dataclasses.fields(cfg_cls):
        assert f"--{f.name}" in r.stdout, f"--help does not list --{f.name}"


@pytest.mark.parametrize("path", PART_FILES, ids=lambda p: p.stem)
def test_imports_only_allowed(path):
    tree = ast.parse(path.read_text())
    stdlib = set(sys.stdlib_module_names)
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
               and any(h.type is not None and "ImportError" in ast.unparse(h.type) for h in t.handlers)
               for stmt in t.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {path.name}"
            mods = [node.module]
        else:
            continue
        for mod in mods:
            top = mod.split(".")[0]
            assert not PART_RE.match(top), f"{path.name} imports another part: {mod}"
            ok = top in stdlib or top in ALLOWED or (top in OPTIONAL and id(node) in guarded)
            assert ok, f"{path.name} imports {mod}"


@pytest.mark.parametrize("prev,nxt", list(zip(PART_FILES, PART_FILES[1:])),
                         ids=lambda p: p.stem[:6])
def test_names_carry_forward(prev, nxt):
    a, b = ast.parse(prev.read_text()), ast.parse(nxt.read_text())
    missing = top_level_names(a) - top_level_names(b) - replaced(ast.get_docstring(b))
    assert not missing, f"{nxt.name} drops {sorted(missing)} without 'Replaces:'"


@pytest.mark.parametrize("path", PART_FILES, ids=lambda p: p.stem)
def test_common_names(path):
    mod = load(path.stem)
    for name in ("Config", "main", "parse_args", "die", "pick_device", "pick_dtype", "set_seed"):
        assert hasattr(mod, name), f"{path.name} lacks {name}"
