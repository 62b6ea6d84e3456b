"""Packaging.

- Our import name `kernels` is also a Hugging Face package that diffusers and transformers probe
  for (hub kernels, versions [0.18.2, 0.19)). Our distribution is "onejudge" 0.1.0, so their probes
  must answer False, and `import kernels` must stay ours.
- pyproject's dependencies are exactly the third-party imports of the package directories (an
  undeclared import or an unused declaration fails), optional imports are guarded and in their
  extra, and [dev] covers tests/ and bench/.
- constraints.txt pins what the tests ran with, torch excepted; scripts/setup_env.sh is run
  against a fake venv to check which torch build it asks pip for."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.metadata as md, json, sys
import diffusers.utils.import_utils as diffusers_utils
import transformers.utils.import_utils as transformers_utils
report = {"diffusers": diffusers_utils.is_kernels_available(),
          "transformers": transformers_utils.is_kernels_available()}
import kernels
report["kernels_file"] = kernels.__file__
report["has_our_api"] = all(hasattr(kernels, n) for n in ("nft_loss", "group_rewards", "masked_blend_step"))
report["distributions"] = md.packages_distributions().get("kernels", [])
try:
    md.version("kernels")
    report["kernels_dist"] = True
except md.PackageNotFoundError:
    report["kernels_dist"] = False
dist = md.distribution("onejudge")
report["name"], report["version"] = dist.metadata["Name"], dist.version
for package in ("core", "kernels", "reward", "rl"):
    __import__(package)
report["imported"] = sorted(p for p in ("core", "kernels", "reward", "rl") if p in sys.modules)
print(json.dumps(report))
"""


def test_hugging_face_probes_do_not_take_our_kernels_for_theirs(tmp_path):
    # a fresh interpreter, so that no probe result is cached; outside the checkout, so the
    # installed package is what gets imported
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["diffusers"] is False and report["transformers"] is False
    assert report["has_our_api"] and Path(report["kernels_file"]).resolve().parent == ROOT / "kernels"
    assert report["name"] == "onejudge" and report["name"] != "kernels" and report["version"] == "0.1.0"
    assert report["kernels_dist"] is False and report["distributions"] == ["onejudge"] * len(report["distributions"])
    assert report["imported"] == ["core", "kernels", "reward", "rl"]


# -- declared dependencies = what the package imports ----------------------------------------------
# An import name that is not its distribution's name (PEP 503-normalised); a dotted name means that
# importing that submodule needs the distribution as well as its top-level package's.
IMPORT_TO_DIST = {"PIL": "pillow", "yaml": "pyyaml", "torch.utils.tensorboard": "tensorboard"}
# Modules imported only under an extra: import name -> extra. Each import of them must sit in a
# function or a try/except ImportError, so that the package imports without them.
OPTIONAL_IMPORTS = {"wandb": "wandb"}
# Declared distributions that no code imports by name, and why they are declared.
NOT_IMPORTED = {
    "flash-attn": "gpu extra: diffusers' and transformers' attention backend, chosen by name",
    "xformers": "gpu extra: diffusers' attention backend, chosen by name",
    "pytest-timeout": "dev extra: pytest plugin behind `timeout` in [tool.pytest.ini_options]",
}
# Torch is chosen by scripts/setup_env.sh (CPU or CUDA build), triton and the CUDA libraries by torch.
NOT_PINNED = {"torch", "triton", "onejudge"}
IMPORT_GUARDS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dist(requirement_or_module: str) -> str:
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement_or_module).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def _package_dirs() -> list[str]:
    patterns = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({p.rstrip("*").rstrip(".") for p in patterns})


def _imports(directory: Path):
    """(dotted module, file:line, guarded) for every absolute import under `directory`, including
    importlib.import_module / __import__ with a literal name; guarded: inside a function or a
    try whose handlers catch ImportError."""
    found = []

    def visit(node, path, guarded):
        if isinstance(node, ast.Import):
            found.extend((a.name, f"{path}:{node.lineno}", guarded) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend((node.module if a.name == "*" else f"{node.module}.{a.name}", f"{path}:{node.lineno}",
                          guarded) for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and ast.unparse(node.func) in (
                    "importlib.import_module", "import_module", "__import__"):
            found.append((node.args[0].value, f"{path}:{node.lineno}", guarded))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            guarded = True
        if isinstance(node, ast.Try):
            caught = {ast.unparse(h.type).split(".")[-1] if h.type is not None else "BaseException"
                      for h in node.handlers}
            caught = {n for c in caught for n in re.findall(r"\w+", c)}
            for child in node.body:
                visit(child, path, guarded or bool(caught & IMPORT_GUARDS))
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, path, guarded)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, path, guarded)

    for path in sorted(directory.rglob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), path.relative_to(ROOT), False)
    return found


def _third_party(found, local: set[str]):
    """{distribution: [(module, where, guarded)]} for the imports that are neither stdlib nor `local`."""
    by_dist: dict[str, list] = {}
    for module, where, guarded in found:
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in local or top == "__future__":
            continue
        dists = {IMPORT_TO_DIST.get(top, _dist(top))}
        dists |= {d for name, d in IMPORT_TO_DIST.items() if module == name or module.startswith(name + ".")}
        for d in dists:
            by_dist.setdefault(d, []).append((module, where, guarded))
    return by_dist


def _package_imports():
    packages = _package_dirs()
    found = [i for p in packages for i in _imports(ROOT / p)]
    return _third_party(found, set(packages))


def test_bench_is_no_part_of_the_package():
    # bench/ is run from the checkout (make bench); its imports are checked against dev below
    assert _package_dirs() == ["core", "kernels", "reward", "rl"]


def test_dependencies_are_exactly_what_the_package_imports():
    project = _pyproject()["project"]
    declared = {_dist(r) for r in project["dependencies"]}
    imported = _package_imports()
    optional = {IMPORT_TO_DIST.get(m, _dist(m)) for m in OPTIONAL_IMPORTS}
    required = set(imported) - optional
    undeclared = {d: sorted({w for _, w, _ in imported[d]}) for d in sorted(required - declared)}
    assert not undeclared, (f"imported but not in [project] dependencies: {undeclared}; declare them, or, when "
                            "the import is guarded and belongs to an extra, list it in OPTIONAL_IMPORTS")
    unused = declared - required - set(NOT_IMPORTED)
    assert not unused, (f"in [project] dependencies but imported nowhere in {_package_dirs()}: {sorted(unused)} "
                        "(a dependency of a dependency needs no declaration of its own)")
    # the exceptions stay true: declared somewhere, and really not imported
    everything = declared | {_dist(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    assert set(NOT_IMPORTED) <= everything
    assert not set(NOT_IMPORTED) & set(imported)


def test_optional_imports_are_guarded_and_come_with_their_extra():
    project = _pyproject()["project"]
    declared = {_dist(r) for r in project["dependencies"]}
    imported = _package_imports()
    for module, extra in OPTIONAL_IMPORTS.items():
        dist = IMPORT_TO_DIST.get(module, _dist(module))
        assert dist in imported, f"{module} is no longer imported: drop it from OPTIONAL_IMPORTS and [{extra}]"
        assert dist not in declared, f"{dist} is optional ([{extra}]), not a dependency of every install"
        assert dist in {_dist(r) for r in project["optional-dependencies"][extra]}
        unguarded = [w for _, w, guarded in imported[dist] if not guarded]
        assert not unguarded, f"{module} is imported at module level, outside a try/except ImportError: {unguarded}"


def test_the_dev_extra_covers_the_tests_and_bench():
    project = _pyproject()["project"]
    available = {_dist(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    local = set(_package_dirs()) | {"bench", "tests", "conftest"}
    local |= {p.stem for p in (ROOT / "tests").rglob("*.py")} | {p.name for p in (ROOT / "tests").rglob("*") if p.is_dir()}
    used = _third_party([i for d in ("tests", "bench") for i in _imports(ROOT / d)], local)
    missing = {d: sorted({w for _, w, _ in used[d]})[:3] for d in sorted(set(used) - available)}
    assert not missing, f"imported by tests/ or bench/ but in neither dependencies nor [dev]: {missing}"
    dev = {_dist(r) for r in project["optional-dependencies"]["dev"]}
    unused = dev - set(used) - set(_package_imports()) - set(NOT_IMPORTED)
    assert not unused, f"in [dev] but imported nowhere: {sorted(unused)}"


def test_import_names_map_to_the_installed_distributions():
    # keeps IMPORT_TO_DIST honest: where a distribution is installed, its metadata says which
    # top-level names it provides
    import importlib.metadata as md

    provides = md.packages_distributions()
    checked = 0
    for dist, uses in _package_imports().items():
        for module, _, _ in uses:
            top = module.split(".")[0]
            if top not in provides or IMPORT_TO_DIST.get(top, _dist(top)) != dist:
                continue  # not installed here (an extra), or the dotted tensorboard entry
            assert dist in {_dist(d) for d in provides[top]}, (module, dist, provides[top])
            checked += 1
    assert checked


# -- constraints.txt: the versions the tests passed with ---------------------------------------------
def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert match, f"constraints.txt: {line!r} is not NAME==VERSION"
        assert _dist(match[1]) not in pins, f"constraints.txt pins {match[1]} twice"
        pins[_dist(match[1])] = match[2]
    return pins


def test_constraints_pin_what_the_tests_need_and_leave_torch_to_the_set_up_script():
    pins = _pins()
    project = _pyproject()["project"]
    needed = {_dist(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]} - NOT_PINNED
    assert not needed - set(pins), f"no pin for {sorted(needed - set(pins))}"
    assert "accelerate" in pins  # no longer declared; still comes with peft
    chosen_elsewhere = {d for d in pins if d in NOT_PINNED or d.startswith("nvidia-")}
    assert not chosen_elsewhere, f"constraints.txt must leave {sorted(chosen_elsewhere)} to scripts/setup_env.sh"


def test_the_makefile_reinstalls_when_the_pins_change():
    stamp_rule = next(line for line in (ROOT / "Makefile").read_text().splitlines()
                      if line.startswith("$(STAMP):"))
    assert set(stamp_rule.split(":", 1)[1].split()) >= {"pyproject.toml", "scripts/setup_env.sh", "constraints.txt"}


# -- scripts/setup_env.sh, with a fake venv python (no network, no real install) ---------------------
SETUP = ROOT / "scripts" / "setup_env.sh"
FAKE_PYTHON = r"""#!/usr/bin/env bash
# logs each call (arguments ended by \x1f, calls by \x1e); pip installs succeed unless FAKE_FAILS matches
{ printf '%s\x1f' "$@"; printf '\x1e'; } >> "$FAKE_LOG"
if [ "$1" = -c ]; then
    if [ "$2" = "import torch" ]; then [ -e "$FAKE_STATE/torch" ]; exit $?; fi
    echo "[setup] torch FAKE"; exit 0
fi
if [ "$1 $2 $3" = "-m pip install" ]; then
    if [ -n "${FAKE_FAILS:-}" ] && [[ " $* " == *"$FAKE_FAILS"* ]]; then echo "fake pip: no" >&2; exit 1; fi
    if [[ " $* " == *" torch"* ]]; then touch "$FAKE_STATE/torch"; fi
    exit 0
fi
exit 3
"""
PIP = ["-m", "pip", "install", "--disable-pip-version-check", "-q"]


def _setup(tmp_path, *, gpu=False, torch_installed=False, dry_run=False, venv=None, **env):
    """Runs scripts/setup_env.sh against a fake venv (and a fake nvidia-smi that does or does not
    answer); returns (the pip/python calls, stdout)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    for d in (bin_dir, state):
        d.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/usr/bin/env bash\nexit {0 if gpu else 9}\n")
    smi.chmod(0o755)
    if venv is None:
        venv = tmp_path / "venv"
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        python = venv / "bin" / "python"
        python.write_text(FAKE_PYTHON)
        python.chmod(0o755)
    if torch_installed:
        (state / "torch").touch()
    log = tmp_path / "calls.log"
    log.write_text("")
    base = {k: v for k, v in os.environ.items()
            if k not in ("TORCH_SPEC", "TORCH_CPU_INDEX", "SETUP_CONSTRAINTS", "SETUP_DRY_RUN", "PYTHON")}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_STATE=str(state),
                SETUP_DRY_RUN="1" if dry_run else "0", **env)
    done = subprocess.run(["bash", str(SETUP), str(venv)], cwd=tmp_path, env=base, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [call.split("\x1f")[:-1] for call in log.read_text().split("\x1e") if call]
    return calls, done.stdout


def _installs(calls):
    return [c for c in calls if c[:3] == ["-m", "pip", "install"]]


PROJECT_INSTALL = [*PIP, "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[dev]"]
CPU_INDEX_TRY = [*PIP, "--index-url", "https://download.pytorch.org/whl/cpu", "--timeout", "15", "--retries", "0",
                 "torch==2.13.0"]


def test_setup_script_parses():
    subprocess.run(["bash", "-n", str(SETUP)], check=True, timeout=30)


def test_setup_without_a_gpu_takes_torch_from_the_cpu_index(tmp_path):
    calls, out = _setup(tmp_path)
    assert _installs(calls) == [CPU_INDEX_TRY, PROJECT_INSTALL]
    report = [c for c in calls if c[0] == "-c" and c[1] != "import torch"]
    assert len(report) == 1 and "torch.version.cuda" in report[0][1] and "torch.cuda.is_available()" in report[0][1]
    assert "[setup] torch FAKE" in out and "CPU build" in out


def test_setup_without_a_gpu_falls_back_to_the_default_index(tmp_path):
    # the CPU index is unreachable (or lacks the build): exactly what worked before, from pip's own config
    calls, out = _setup(tmp_path, FAKE_FAILS="--index-url")
    assert _installs(calls) == [CPU_INDEX_TRY, [*PIP, "torch==2.13.0"], PROJECT_INSTALL]
    assert "trying the default index" in out and "[setup] torch FAKE" in out


def test_setup_with_a_gpu_keeps_the_cuda_build(tmp_path):
    calls, out = _setup(tmp_path, gpu=True)
    assert _installs(calls) == [[*PIP, "torch>=2.6"], PROJECT_INSTALL]
    assert "NVIDIA GPU found" in out


@pytest.mark.parametrize("gpu", [False, True])
def test_setup_torch_spec_overrides(tmp_path, gpu):
    calls, _ = _setup(tmp_path, gpu=gpu, TORCH_SPEC="torch==2.11.0")
    assert _installs(calls) == [[*PIP, "torch==2.11.0"], PROJECT_INSTALL]


def test_setup_skips_torch_when_it_imports(tmp_path):
    calls, out = _setup(tmp_path, torch_installed=True)
    assert _installs(calls) == [PROJECT_INSTALL]
    assert "already installed" in out and "[setup] torch FAKE" in out


def test_setup_knobs_for_the_index_and_the_pins(tmp_path):
    calls, _ = _setup(tmp_path, TORCH_CPU_INDEX="", SETUP_CONSTRAINTS="")
    assert _installs(calls) == [[*PIP, "torch==2.13.0"], [*PIP, "-e", f"{ROOT}[dev]"]]


def test_setup_dry_run_changes_nothing(tmp_path):
    venv = tmp_path / "no-venv-yet"
    calls, out = _setup(tmp_path, dry_run=True, venv=venv, PYTHON="python3")
    assert calls == [] and not venv.exists()
    would = [line.removeprefix("[setup] would run: ") for line in out.splitlines() if "would run:" in line]
    py = f"{venv}/bin/python"
    assert would == [f"python3 -m venv {venv}", " ".join([py, *CPU_INDEX_TRY]), " ".join([py, *PROJECT_INSTALL])]
