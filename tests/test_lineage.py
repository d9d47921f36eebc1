"""The shape of the curriculum: every part runs --help, imports nothing outside the list,
and keeps every top-level name, Config field and class method (`Class.method`) of the part
before it unless its docstring lists the name under `Replaces:`."""
import ast
import dataclasses
import re
import subprocess
import sys

import pytest

from conftest import PART_FILES, ROOT, load, part_names, part_number, tiny_gpt

ALLOWED = {"torch", "numpy", "regex", "requests"}
OPTIONAL = {"matplotlib", "tensorboard"}  # requirements-extra.txt: only inside try/except ImportError
PART_RE = re.compile(r"^part\d\d_")


FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def top_level_names(tree):
    return {n.name for n in tree.body if isinstance(n, (*FUNCTIONS, ast.ClassDef))}


def config_fields(tree):
    """The fields of the module's `Config` dataclass: its annotated names."""
    (config,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config"]
    return {n.target.id for n in config.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def methods(tree):
    """'Class.method' for every function defined in the body of a top-level class
    (properties, static and class methods included)."""
    return {f"{c.name}.{n.name}" for c in tree.body if isinstance(c, ast.ClassDef)
            for n in c.body if isinstance(n, FUNCTIONS)}


def replaced(doc):
    """The names listed after `Replaces:` (lines of comma or space separated names): top-level
    names, Config fields, `Class.method`."""
    names = set()
    for line in (doc or "").splitlines():
        m = re.match(r"\s*Replaces:\s*(.*)", line)
        if m:
            names.update(n for n in re.split(r"[,\s]+", m.group(1)) if n)
    return names


def dropped(prev_source, next_source):
    """What the later part drops without listing it under Replaces: {kind: sorted names}.
    The methods of a dropped class go with it (the class is the name to list)."""
    a, b = ast.parse(prev_source), ast.parse(next_source)
    allowed, kept = replaced(ast.get_docstring(b)), top_level_names(b)
    out = {"name": top_level_names(a) - kept - allowed,
           "Config field": config_fields(a) - config_fields(b) - allowed,
           "method": {m for m in methods(a) - methods(b) - allowed if m.split(".")[0] in kept}}
    return {kind: sorted(names) for kind, names in out.items() if names}


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
def test_names_fields_and_methods_carry_forward(prev, nxt):
    missing = dropped(prev.read_text(), nxt.read_text())
    assert not missing, f"{nxt.name} drops {missing} without listing them under 'Replaces:'"


PREV = '''"""Part A."""
class Config:
    n_layer: int = 2
    grad_accum: int = 1
    label = "not a field"
class GPT:
    def forward(self): pass
    def new_cache(self): pass
    @property
    def streams(self): pass
class Head:
    def forward(self): pass
def train(): pass
'''


@pytest.mark.parametrize("change,kind,name", [
    (("    grad_accum: int = 1\n", ""), "Config field", "grad_accum"),
    (("    def new_cache(self): pass\n", ""), "method", "GPT.new_cache"),
    (("    @property\n    def streams(self): pass\n", ""), "method", "GPT.streams"),
    (("def train(): pass\n", ""), "name", "train"),
    (("class Head:\n    def forward(self): pass\n", ""), "name", "Head")])
def test_a_silent_drop_is_caught_and_replaces_allows_it(change, kind, name):
    """The check itself, on a two-class toy part: each drop is reported, and the same drop
    listed under Replaces: (by itself or beside other names) is allowed."""
    nxt = PREV.replace(*change)
    assert nxt != PREV
    assert dropped(PREV, PREV) == {}
    assert dropped(PREV, nxt) == {kind: [name]}
    for line in (f"Replaces: {name}", f"Replaces: other, {name}  more", f"Replaces:\n  x\nReplaces: {name}"):
        assert dropped(PREV, nxt.replace('"""Part A."""', f'"""Part B.\n\n{line}\n"""')) == {}


@pytest.mark.parametrize("path", PART_FILES, ids=lambda p: p.stem)
def test_common_names(path):
    mod = load(path.stem)
    for name in ("Config", "main", "parse_args", "die", "pick_device", "pick_dtype", "set_seed"):
        assert hasattr(mod, name), f"{path.name} lacks {name}"


@pytest.mark.parametrize("lesson", [part_number(n) for n in part_names(1)][:-1])
def test_a_lesson_builds_its_own_model_on_every_later_part(lesson):
    """conftest.tiny_gpt(mod, lesson) on a later part has the parameters of the lesson's own
    tiny model, name for name and shape for shape: what later parts switched on by default
    (the modern stack, experts) is switched off by conftest.SWITCHED_ON, so an early
    lesson's test checks its own idea on every later part."""
    def shapes(model):
        return {n: tuple(p.shape) for n, p in model.named_parameters()}

    own = shapes(tiny_gpt(load(part_names(lesson)[0]), lesson))
    for name in part_names(lesson + 1):
        assert shapes(tiny_gpt(load(name), lesson)) == own, name
