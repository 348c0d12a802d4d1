"""Project-level checks: lint, packaging, README commands, the CI workflow and setup/check_env.py.

These keep the documentation honest: the README's test command must be the one `.ci/run`
and the GitHub workflow run, its links must point at files that exist, and the minimum
versions in requirements.txt, pyproject.toml and setup/check_env.py must agree.
"""

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READMES = [REPO / "README.md", REPO / "README.zh-CN.md"]
WORKFLOWS = sorted([*(REPO / ".github" / "workflows").glob("*.yml"),
                    *(REPO / ".github" / "workflows").glob("*.yaml")])
CHECK_ENV = REPO / "setup" / "check_env.py"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def run(args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          encoding="utf-8", errors="replace", **kw)


# --- pyproject / requirements ---------------------------------------------------------------------

def pyproject_text() -> str:
    return read(REPO / "pyproject.toml")


def pyproject_list(key: str) -> list[str]:
    """The quoted strings of a top-level `key = [...]` list (no TOML parser on Python 3.10)."""
    m = re.search(rf"^{re.escape(key)}\s*=\s*\[(.*?)\]", pyproject_text(), re.M | re.S)
    assert m, f"{key} not found in pyproject.toml"
    return re.findall(r'"([^"]+)"', m.group(1))


def package_dirs() -> dict[str, str]:
    """Every package in pyproject.toml -> its folder: the package-dir mapping (the appendices), else the
    dotted name as a path (`ch05.llama` -> ch05/llama)."""
    section = pyproject_text().split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    mapped = dict(re.findall(r'^(\w+)\s*=\s*"([^"]+)"', section, re.M))
    return {name: mapped.get(name, name.replace(".", "/")) for name in pyproject_list("packages")}


def minimums(lines) -> dict[str, str]:
    """'torch>=2.2' -> {'torch': '2.2'}; names normalised (case, '-' vs '_')."""
    found = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^\s,;#]*)", line)
        if m:
            found[m.group(1).lower().replace("-", "_")] = m.group(2)
    return found


def load_check_env():
    spec = importlib.util.spec_from_file_location("check_env", CHECK_ENV)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_every_chapter_folder_is_a_package():
    dirs = package_dirs()
    assert set(dirs) == set(pyproject_list("packages"))
    on_disk = {str(p.parent.relative_to(REPO)) for p in REPO.glob("*/__init__.py")}
    on_disk |= {str(p.parent.relative_to(REPO)) for p in REPO.glob("ch0*/*/__init__.py")}
    on_disk -= {"tests"}
    assert on_disk <= set(dirs.values()), f"folders missing from pyproject.toml: {on_disk - set(dirs.values())}"


@pytest.mark.parametrize("package", pyproject_list("packages"))
def test_package_imports_from_this_checkout(package):
    folder = REPO / package_dirs()[package]
    assert (folder / "__init__.py").is_file(), f"{folder.name}/ needs an __init__.py (a docstring is enough)"
    module = importlib.import_module(package)
    assert module.__file__ is not None, (
        f"{package} imports as a namespace package: reinstall with `pip install -r requirements.txt`")
    assert Path(module.__file__).resolve() == (folder / "__init__.py").resolve(), (
        f"{package} is imported from {module.__file__}, not this checkout; "
        "install it with `pip install -r requirements.txt`")


def test_minimum_versions_agree():
    req = read(REPO / "requirements.txt").splitlines()
    req_min = minimums(req)
    py_min = minimums(pyproject_list("dependencies"))
    assert py_min, "no dependencies parsed from pyproject.toml"
    for name, version in py_min.items():
        assert req_min.get(name) == version, f"{name}: pyproject says >={version}, requirements.txt {req_min.get(name)}"
    check_env = load_check_env()
    for module_name, dist, minimum, _ in check_env.PACKAGES:
        key = dist.lower().replace("-", "_")
        assert req_min.get(key) == minimum, f"setup/check_env.py: {dist}>={minimum}, requirements.txt {req_min.get(key)}"
    requires_python = re.search(r'requires-python\s*=\s*">=([\d.]+)"', pyproject_text()).group(1)
    assert ".".join(map(str, check_env.MIN_PYTHON)) == requires_python
    assert "-e ." in [line.strip() for line in req]
    test_req = [line.strip() for line in read(REPO / "requirements-test.txt").splitlines()]
    assert "-r requirements.txt" in test_req and "-e .[test]" in test_req


def test_ruff_is_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -r requirements-test.txt)")
    result = run([sys.executable, "-m", "ruff", "check", "--no-cache", "."])
    assert result.returncode == 0, result.stdout + result.stderr


# --- README ------------------------------------------------------------------------------------

def ci_test_command() -> str:
    """The pytest command `.ci/run` runs (its last word on what the test command is)."""
    commands = [line.strip() for line in read(REPO / ".ci" / "run").splitlines()
                if re.match(r"^\s*python -m pytest\b", line)]
    assert len(commands) == 1, f".ci/run should run pytest exactly once, found {commands}"
    return commands[0]


def code_blocks(text: str) -> list[list[str]]:
    return [block.strip("\n").splitlines() for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)]


def test_ci_installs_requirements_test():
    ci = read(REPO / ".ci" / "run")
    assert re.search(r"^python -m pip install .*-r requirements-test\.txt\s*$", ci, re.M)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_readme_states_the_ci_test_command(readme):
    expected = ["pip install -r requirements-test.txt", ci_test_command()]
    assert expected in code_blocks(read(readme)), f"{readme.name} should show the test command {expected}"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_readme_commands_and_settings(readme):
    text = read(readme)
    commands = [line.split("#")[0].strip() for block in code_blocks(text) for line in block]
    for command in ["pip install -r requirements.txt", "python -m ch05.gpt_train --quick", "jupyter lab",
                    "python setup/check_env.py"]:
        assert command in commands, f"{readme.name} lacks the command {command!r}"
    # The main job at the book's settings is named in the text (the blocks run top to bottom, in quick mode).
    assert "`python -m ch05.gpt_train`" in text, f"{readme.name} does not name the main job's command"
    for name in ["LLMFS_DATA_MIRROR", "LLMFS_CACHE_DIR", "LLMFS_QUICK", "LLMFS_DEVICE", "HF_ENDPOINT",
                 "HF_HUB_OFFLINE", "~/.cache/llms-from-scratch", "gpt2.tiktoken", "openai-whisper==20250625"]:
        assert name in text, f"{readme.name} does not mention {name}"
    assert re.search(r"^## Performance", text, re.M)


def chapter_rows(text: str) -> list[list[str]]:
    """Per chapter-table row, the link targets it holds."""
    rows = [line for line in text.splitlines() if re.match(r"^\| [2-7A-E] ", line)]
    return [re.findall(r"\]\(([^)]+)\)", row) for row in rows]


def test_readmes_are_in_step():
    en, zh = (read(p) for p in READMES)
    assert len(chapter_rows(en)) == 32  # 9 chapters and appendices + a row per bonus notebook topic
    assert chapter_rows(en) == chapter_rows(zh)
    assert len(re.findall(r"^## ", en, re.M)) == len(re.findall(r"^## ", zh, re.M))
    # Same commands in the same order; only the comments are translated.
    def commands(text):
        return [[line.split("#")[0].rstrip() for line in block] for block in code_blocks(text)]

    assert commands(en) == commands(zh)
    for module in ["ch02/tokenizer.py", "ch02/dataloader.py", "ch03/attention.py", "ch04/gpt.py",
                   "ch05/gpt_train.py", "ch05/gpt_generate.py", "ch05/gpt_download.py",
                   "ch06/gpt_class_finetune.py", "ch07/gpt_instruction_finetuning.py",
                   "ch07/ollama_evaluate.py", "appendix-A/DDP-script.py", "appendix_d", "appendix_e"]:
        assert module in en and module in zh
    # The new-layout sections (a Layout section, an environment-variable table) exist in both.
    assert re.search(r"^## Layout$", en, re.M) and re.search(r"^## 目录结构$", zh, re.M)
    assert re.search(r"^## Environment variables$", en, re.M) and re.search(r"^## 环境变量$", zh, re.M)


@pytest.mark.parametrize("doc", [*READMES, REPO / "setup" / "README.md", REPO / "benchmarks" / "README.md"],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_exist(doc):
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", read(doc)):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(REPO)} links to missing files: {missing}"


# --- GitHub workflow ---------------------------------------------------------------------------

def load_yaml(path: Path):
    try:
        from ruamel.yaml import YAML  # installed with check-jsonschema; YAML 1.2, so `on` stays a string
        return YAML(typ="safe", pure=True).load(read(path))
    except ImportError:
        yaml = pytest.importorskip("yaml")
        data = yaml.safe_load(read(path))
        if True in data:  # YAML 1.1 reads the key `on` as True
            data["on"] = data.pop(True)
        return data


def test_workflows_exist():
    assert REPO / ".github" / "workflows" / "tests.yml" in WORKFLOWS


def test_workflows_match_the_github_schema():
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed (pip install -r requirements-test.txt)")
    # The schema ships inside check-jsonschema (--builtin-schema), so this works offline.
    result = run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                  *map(str, WORKFLOWS)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_runs_the_readme_test_command_on_every_platform():
    wf = load_yaml(REPO / ".github" / "workflows" / "tests.yml")
    assert {"push", "pull_request"} <= set(wf["on"])
    (job,) = wf["jobs"].values()
    matrix = job["strategy"]["matrix"]
    assert {os_name.split("-")[0] for os_name in matrix["os"]} == {"ubuntu", "macos", "windows"}
    assert job["runs-on"] == "${{ matrix.os }}"
    # Quoted in the YAML: an unquoted 3.10 would be read as the number 3.1.
    assert matrix["python-version"] == ["3.10", "3.13"]

    steps = job["steps"]
    setup_python = next(s for s in steps if str(s.get("uses", "")).startswith("actions/setup-python"))
    assert setup_python["with"]["cache"] == "pip"
    assert setup_python["with"]["python-version"] == "${{ matrix.python-version }}"

    runs = [(i, s.get("if", ""), [line.strip() for line in s.get("run", "").splitlines()])
            for i, s in enumerate(steps)]
    test_steps = [i for i, _, lines in runs if ci_test_command() in lines]
    assert len(test_steps) == 1, "exactly one step runs the README's test command"
    installs = [(i, cond, line) for i, cond, lines in runs for line in lines
                if "pip install" in line and "-r requirements-test.txt" in line]
    assert installs and all(i < test_steps[0] for i, _, _ in installs)
    cpu = [(cond, line) for _, cond, line in installs if f"--extra-index-url {CPU_INDEX}" in line]
    assert cpu and all("runner.os != 'macOS'" in cond for cond, _ in cpu), \
        "Linux and Windows install CPU-only torch from PyTorch's index"
    mac = [line for _, cond, line in installs if "runner.os == 'macOS'" in cond]
    assert mac == ["python -m pip install -r requirements-test.txt"]


# --- setup/check_env.py ------------------------------------------------------------------------

def test_check_env_passes_here():
    result = run([sys.executable, str(CHECK_ENV)])
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"\[ok\s*\] GPT-2 tokenizer", out)
    assert re.search(r"\[ok\s*\] device", out)
    for name in ["torch", "tiktoken", "numpy", "pandas", "matplotlib", "tqdm", "pooch", "huggingface_hub",
                 "safetensors", "jupyterlab"]:
        assert re.search(rf"\] {name}\s", out), f"{name} not reported"
    assert "All required checks passed." in out


def test_check_env_command_line_errors_are_llmfs_clis_one_line(capsys):
    from llmfs.cli import Parser

    result = run([sys.executable, str(CHECK_ENV), "--downlaod"])
    assert result.returncode == 2 and result.stdout == ""
    with pytest.raises(SystemExit):
        Parser(prog="python setup/check_env.py").parse_args(["--downlaod"])
    assert result.stderr == capsys.readouterr().err == "error: unrecognized arguments: --downlaod (see --help)\n"
    result = run([sys.executable, str(CHECK_ENV), "--help"])
    assert result.returncode == 0 and result.stdout.startswith("usage: python setup/check_env.py ")


def test_check_env_runs_where_torch_is_missing():
    """Why it has its own copy of llmfs.cli.Parser: it must report a missing torch, not crash on it."""
    code = (f"import runpy, sys; sys.modules['torch'] = None; sys.argv = [{str(CHECK_ENV)!r}]; "
            f"runpy.run_path({str(CHECK_ENV)!r}, run_name='__main__')")
    result = run([sys.executable, "-c", code])
    assert result.returncode == 1, result.stderr
    assert re.search(r"\[FAIL\] torch\s+not installed", result.stdout) and "Traceback" not in result.stderr


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """An empty data mirror and an empty cache folder (returned; not created)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LLMFS_DATA_MIRROR", str(empty))
    monkeypatch.setenv("LLMFS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_check_env_missing_data_is_only_a_note(monkeypatch, no_data, capsys):
    check_env = load_check_env()
    monkeypatch.setattr(check_env, "host_reachable", lambda host, timeout=3.0: True)  # online; no real network
    assert check_env.main([]) == 0
    from llmfs.download import DATA_FILES

    assert capsys.readouterr().out.count("will download on first use") == len(DATA_FILES)
    assert not no_data.exists()  # nothing was downloaded


def test_check_env_says_plainly_when_offline_without_the_data(monkeypatch, no_data, capsys):
    check_env = load_check_env()
    asked = []
    monkeypatch.setattr(check_env, "host_reachable", lambda host, timeout=3.0: asked.append(host) and False)
    assert check_env.main([]) == 1
    out = capsys.readouterr().out
    assert "All required checks passed" not in out
    from llmfs.download import DATA_FILES

    assert re.search(rf"offline: {len(DATA_FILES)} files missing; .*LLMFS_DATA_MIRROR.*check_env\.py --download", out)
    assert asked and all(isinstance(h, str) and h for h in asked)


def test_cpu_requirements_point_pip_at_pytorchs_cpu_wheels():
    lines = [line.strip() for line in read(REPO / "requirements-cpu.txt").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == ["--extra-index-url https://download.pytorch.org/whl/cpu", "-r requirements.txt"]
    for readme in READMES:
        text = read(readme)
        assert "pip install -r requirements-cpu.txt" in text and "6 GB" in text and "python3 -m venv" in text


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    text = read(REPO / "pyproject.toml")
    assert re.search(r'^license = "Apache-2\.0"$', text, re.M)
    m = re.search(r'requires = \["setuptools>=(\d+)', text)
    assert m and int(m.group(1)) >= 77  # PEP 639 license strings need setuptools 77


def test_outputs_go_to_the_environments_folder_during_tests():
    from llmfs.runtime import outputs_dir

    root = Path(os.environ["LLMFS_OUTPUT_DIR"])
    assert outputs_dir("ch05") == root / "ch05" and REPO not in root.parents


def test_check_env_fails_on_a_missing_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pooch", None)  # makes `import pooch` fail
    assert load_check_env().main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\[FAIL\] pooch\s+not installed", out)
    assert "pip install -r requirements.txt" in out


def test_check_env_version_helpers():
    check_env = load_check_env()
    assert check_env.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert check_env.version_tuple("1.26.4rc1") == (1, 26, 4)
    assert check_env.at_least("2.2", "2.2.0") and check_env.at_least("2.10.1", "2.2")
    assert not check_env.at_least("0.4.9", "0.5")


def test_check_env_reports_old_and_missing_packages(capsys):
    check_env = load_check_env()
    report = check_env.Report()
    check_env.check_packages(report, [("numpy", "numpy", "999.0", True),
                                      ("no_such_module_llmfs", "no-such-dist", "1.0", True),
                                      ("also_missing_llmfs", "also-missing", "1.0", False)])
    assert len(report.errors) == 2 and len(report.warnings) == 1
    assert 'pip install --upgrade "numpy>=999.0"' in report.errors[0]
    assert "no_such_module_llmfs not installed" in report.errors[1]


def test_check_env_fails_on_a_broken_tokenizer(monkeypatch, capsys):
    import ch02.tokenizer

    class Broken:
        n_vocab = 50257

        def encode(self, text, allowed_special=()):
            return [0] * 3

    monkeypatch.setattr(ch02.tokenizer, "get_gpt2_tokenizer", lambda: Broken())
    assert load_check_env().main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\[FAIL\] GPT-2 tokenizer\s+wrong ids", out)
    assert "git checkout -- ch02/gpt2.tiktoken" in out


def test_check_env_fails_on_a_corrupt_data_file(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLMFS_DATA_MIRROR", str(tmp_path))
    (tmp_path / "the-verdict.txt").write_text("not the verdict")
    assert load_check_env().main([]) == 1
    out = capsys.readouterr().out
    assert "checksum does not match" in out and "the-verdict.txt" in out


def test_check_env_fails_on_an_unknown_device(monkeypatch, capsys):
    monkeypatch.setenv("LLMFS_DEVICE", "gpu")
    assert load_check_env().main([]) == 1
    assert "Unset LLMFS_DEVICE" in capsys.readouterr().out


def test_check_env_download_failure_is_reported(monkeypatch, tmp_path, capsys):
    import dataclasses

    from llmfs.download import DATA_FILES

    monkeypatch.setenv("LLMFS_DATA_MIRROR", str(tmp_path / "no-mirror"))
    monkeypatch.setenv("LLMFS_CACHE_DIR", str(tmp_path / "cache"))
    for name in list(DATA_FILES):
        monkeypatch.setitem(DATA_FILES, name, dataclasses.replace(DATA_FILES[name], url="http://127.0.0.1:1/x"))
    check_env = load_check_env()
    report = check_env.Report()
    check_env.check_data(report, download=True)
    assert len(report.errors) == len(DATA_FILES)
    assert all("http://127.0.0.1:1/x" in e for e in report.errors)
    assert any("is not a folder" in w for w in report.warnings)


# --- import structure --------------------------------------------------------------------------------

def _chapter_import_graph() -> dict[str, set[str]]:
    """Module -> the chapter modules it imports, at module level or inside functions (an import hidden in
    a function is still a dependency), leaving out `if __name__ == "__main__":` blocks, which run only
    when the file is the program and so never take part in importing it."""
    import ast

    packages = {"ch02": "ch02", "ch03": "ch03", "ch04": "ch04", "ch05": "ch05", "ch06": "ch06", "ch07": "ch07",
                "appendix_a": "appendix-A", "appendix_d": "appendix-D", "appendix_e": "appendix-E"}
    modules = {(name if py.stem == "__init__" else f"{name}.{py.stem}"): py
               for name, folder in packages.items() for py in (REPO / folder).glob("*.py")}

    def is_main_block(node) -> bool:
        return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        tree.body = [node for node in tree.body if not is_main_block(node)]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module} & modules.keys()
                deps |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & modules.keys()
        graph[module] = deps - {module}
    return graph


def test_no_import_cycles_inside_or_between_chapters():
    graph = _chapter_import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"
    # and later chapters build on earlier ones, never the other way round
    order = ["ch02", "ch03", "ch04", "ch05", "ch06", "ch07"]
    backwards = [(m, d) for m, deps in graph.items() for d in deps
                 if m.split(".")[0] in order and d.split(".")[0] in order
                 and order.index(d.split(".")[0]) > order.index(m.split(".")[0])]
    assert not backwards, f"an earlier chapter imports a later one: {backwards}"


def test_ci_also_runs_the_fast_suite_on_the_oldest_and_newest_python():
    ci = read(REPO / ".ci" / "run")
    # the whole fast suite, with the same requirements (PyTorch included), not a torch-free subset
    assert 'pip install -q -r requirements-test.txt ) > ".ci-install-$version.log" 2>&1 &' in ci
    assert '-m pytest -q -p no:cacheprovider \\\n      -m "not notebook"' in ci
    assert "SUPPORTED_MIN=10" in ci and "SUPPORTED_MAX=13" in ci and "CI_EXTRA_TIMEOUT" in ci
    assert 'requires-python = ">=3.10"' in read(REPO / "pyproject.toml")
    result = run(["bash", "-n", str(REPO / ".ci" / "run")])
    assert result.returncode == 0, result.stderr


@pytest.fixture
def cuda_build_without_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LLMFS_DEVICE", raising=False)
    check_env = load_check_env()
    monkeypatch.setattr(check_env.platform, "system", lambda: "Linux")
    return check_env


def test_check_env_recommends_the_cpu_build_without_a_gpu_only_where_its_index_answers(cuda_build_without_gpu,
                                                                                    monkeypatch):
    check_env = cuda_build_without_gpu
    asked = []
    monkeypatch.setattr(check_env, "host_reachable", lambda host, timeout=3.0: asked.append(host) or True)
    report = check_env.Report()
    check_env.check_device(report)
    assert asked == ["download.pytorch.org"]
    [note] = [n for n in report.notes if "CUDA 12.4 build" in n]
    assert "no NVIDIA GPU is usable here" in note and "6 GB" in note and "answers from here" in note
    assert note.endswith("in a new virtual environment, pip install -r requirements-cpu.txt")
    assert not any("install a CUDA build" in n for n in report.notes)  # it has one


def test_check_env_never_recommends_requirements_cpu_when_download_pytorch_org_is_unreachable(
        cuda_build_without_gpu, monkeypatch):
    """That command would fall back to the same CUDA build: what the user just got."""
    check_env = cuda_build_without_gpu
    monkeypatch.setattr(check_env, "host_reachable", lambda host, timeout=3.0: False)
    report = check_env.Report()
    check_env.check_device(report)
    [note] = [n for n in report.notes if "CUDA 12.4 build" in n]
    assert "download.pytorch.org, which cannot be reached from here" in note
    assert "would install this same build again" in note and "mirror of PyTorch's CPU wheel index" in note
    assert "pip install -r requirements.txt" in note and "pip install -r requirements-cpu.txt" not in note


def test_check_env_says_which_pytorch_build_is_installed(monkeypatch, capsys):
    import torch

    check_env = load_check_env()
    builds = {(None, None, "Linux"): "CPU-only", ("12.8", None, "Linux"): "CUDA 12.8",
              (None, "6.2", "Linux"): "ROCm 6.2", (None, None, "Darwin"): "macOS (CPU and Apple GPU)"}
    for (cuda, hip, system), expected in builds.items():
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch.version, "hip", hip, raising=False)
        assert check_env.torch_build(torch, system) == expected
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(check_env.platform, "system", lambda: "Linux")
    monkeypatch.setattr(check_env, "torch_installed_size", lambda: 0.72)
    monkeypatch.delenv("LLMFS_DEVICE", raising=False)
    report = check_env.Report()
    check_env.check_device(report)
    assert not any("requirements-cpu.txt" in note for note in report.notes)  # the CPU build: nothing to recommend
    assert re.search(rf"\[ok\s*\] PyTorch build\s+CPU-only \(torch {re.escape(torch.__version__)}, 0.7 GB installed\)",
                     capsys.readouterr().out)
    assert check_env.torch_installed_size() > 0.1  # the torch installed here, from its RECORD


def test_check_env_refuses_a_relative_path_variable_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMFS_DATA_MIRROR", "shared/data")
    assert load_check_env().main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\[FAIL\] LLMFS_DATA_MIRROR\s+shared/data is a relative path", out)
    assert f"give an absolute path, e.g. LLMFS_DATA_MIRROR={tmp_path / 'shared' / 'data'}\n" in out
    assert "All required checks passed" not in out
