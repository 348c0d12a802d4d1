"""Check that this machine can run the chapters, without using the network.

    python setup/check_env.py              # report; exit code 1 if something required is missing
    python setup/check_env.py --download   # also download any data file not yet available

It reports the Python and package versions against the project's minimums, which PyTorch
build is installed (CPU-only, CUDA, ROCm, macOS) and its size, the device PyTorch will use,
whether the bundled GPT-2 tokenizer loads and gives the right ids, the folders named by
LLMFS_OUTPUT_DIR, LLMFS_DATA_MIRROR and LLMFS_CACHE_DIR (absolute paths), and where each data
file would be read from. A data file that is not yet downloaded is only a note (the chapters
fetch it on first use); a missing or too-old package, a broken tokenizer, a relative path in
one of those variables or a corrupt data file is an error, reported with what to do about it.

The network is touched only by a quick connection test (3 s at most) of the hosts a
recommendation depends on: the data files' hosts when files are missing, and
download.pytorch.org before recommending the CPU-only PyTorch (which comes from there).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]

MIN_PYTHON = (3, 10)

# (import name, distribution name, minimum version, required?). The minimums match
# pyproject.toml and requirements.txt (tests/test_project.py checks that they do).
PACKAGES = [
    ("torch", "torch", "2.2", True),
    ("tiktoken", "tiktoken", "0.5", True),
    ("numpy", "numpy", "1.24", True),
    ("pandas", "pandas", "2.0", True),
    ("matplotlib", "matplotlib", "3.7", True),
    ("tqdm", "tqdm", "4.66", True),
    ("pooch", "pooch", "1.8", True),
    ("requests", "requests", "2.28", True),
    ("huggingface_hub", "huggingface_hub", "0.23", True),
    ("safetensors", "safetensors", "0.4", True),
    # Only needed to read the notebooks interactively; scripts and tests run without them.
    ("jupyterlab", "jupyterlab", "4.0", False),
    ("ipywidgets", "ipywidgets", "8.0", False),
]

INSTALL_HINT = "pip install -r requirements.txt   (from the repository root, inside your virtual environment)"

# A sentence with the end-of-text token and an unknown word, and its GPT-2 ids.
TOKENIZER_SAMPLE = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
TOKENIZER_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262,
                 4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13]


class Parser(argparse.ArgumentParser):
    """`llmfs.cli.Parser`'s one-line errors (`error: ... (see --help)`, exit code 2). Not imported from
    there: llmfs.cli needs torch, and this script must run, and say so, where torch is missing."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self, status: str, label: str, detail: str = "") -> None:
        print(f"  [{status:<4}] {label:<22} {detail}".rstrip())


def version_tuple(text: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '1.26.4rc1' -> (1, 26, 4). Good enough for minimums."""
    parts = []
    for piece in text.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def at_least(version: str, minimum: str) -> bool:
    have, need = version_tuple(version), version_tuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installed_version(module_name: str, dist_name: str, module) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


def check_python(report: Report) -> None:
    version = platform.python_version()
    need = ".".join(map(str, MIN_PYTHON))
    if sys.version_info[:2] >= MIN_PYTHON:
        report.line("ok", "python", f"{version} (>= {need})  {sys.executable}")
    else:
        report.line("FAIL", "python", f"{version} (need >= {need})")
        report.errors.append(f"Python {version} is too old: install Python {need} or newer and create the "
                             "virtual environment with it (see setup/README.md).")


def check_packages(report: Report, packages=PACKAGES) -> None:
    for module_name, dist_name, minimum, required in packages:
        try:
            if required:
                module = importlib.import_module(module_name)
            else:
                # Optional ones are only located, not imported (importing JupyterLab takes seconds).
                module = None
                if importlib.util.find_spec(module_name) is None:
                    raise ModuleNotFoundError(f"No module named {module_name!r}", name=module_name)
        except Exception as exc:  # ImportError, or a broken install (e.g. a missing DLL)
            status = "FAIL" if required else "warn"
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == module_name
            reason = "not installed" if missing else f"fails to import ({type(exc).__name__}: {exc})"
            report.line(status, module_name, f"{reason} (need >= {minimum})")
            message = f"{module_name} {reason}: {INSTALL_HINT}"
            if required:
                report.errors.append(message)
            else:
                report.warnings.append(f"{message}\n      (only needed to open the notebooks in JupyterLab)")
            continue
        version = installed_version(module_name, dist_name, module)
        if version != "unknown" and not at_least(version, minimum):
            status = "FAIL" if required else "warn"
            report.line(status, module_name, f"{version} (need >= {minimum})")
            message = (f"{module_name} {version} is older than {minimum}: "
                       f"pip install --upgrade \"{dist_name}>={minimum}\"")
            (report.errors if required else report.warnings).append(message)
        else:
            report.line("ok", module_name, f"{version} (>= {minimum})")


def check_project(report: Report) -> bool:
    """Is the project (ch02, ch03, ...) importable? Returns False when it cannot be used at all."""
    try:
        import ch02  # noqa: F401
    except ImportError:
        # Fall back to the checkout this script lives in, so the other checks still run.
        sys.path.insert(0, str(REPO))
        try:
            import ch02  # noqa: F401
        except ImportError as exc:
            report.line("FAIL", "project", f"cannot import ch02 ({exc})")
            report.errors.append(f"The chapters cannot be imported: {INSTALL_HINT}")
            return False
        report.line("FAIL", "project", f"not installed (found {REPO} only because this script lives there)")
        report.errors.append("The project is not installed, so `import ch02` fails outside the repository root "
                             f"(e.g. in a notebook's folder): {INSTALL_HINT}")
        return True
    location = Path(ch02.__file__).resolve().parent.parent
    if location != REPO:
        report.line("warn", "project", f"installed from {location}")
        report.warnings.append(f"`import ch02` loads {location}, not this checkout ({REPO}); "
                               "run `pip install -r requirements.txt` from this checkout to switch.")
    else:
        report.line("ok", "project", f"installed (editable) from {location}")
    return True


PYTORCH_INDEX_HOST = "download.pytorch.org"
CPU_INSTALL = "pip install -r requirements-cpu.txt"


def torch_build(torch_module, system: str | None = None) -> str:
    """Which PyTorch build this is: 'CPU-only', 'CUDA 12.8', 'ROCm 6.2' or 'macOS (CPU and Apple GPU)'."""
    version = getattr(torch_module, "version", None)
    if getattr(version, "hip", None):
        return f"ROCm {version.hip}"
    if getattr(version, "cuda", None):
        return f"CUDA {version.cuda}"
    if (system or platform.system()) == "Darwin":
        return "macOS (CPU and Apple GPU)"
    return "CPU-only"


def torch_installed_size() -> float | None:
    """GB on disk of torch and the GPU libraries installed with it (nvidia-*, triton), from their RECORD files."""
    total = 0
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "torch" or name.startswith("nvidia-") or "triton" in name:
            total += sum(f.size or 0 for f in dist.files or [])
    return total / 1e9 if total else None


def check_device(report: Report) -> None:
    try:
        import torch

        from llmfs.runtime import DEVICE_ENV, get_device
    except Exception:
        return  # already reported as a missing package
    build = torch_build(torch)
    size = torch_installed_size()
    gpu_build = build.startswith(("CUDA", "ROCm"))
    weight = f", {size:.1f} GB installed" + (" with its GPU libraries" if gpu_build else "") if size else ""
    report.line("ok", "PyTorch build", f"{build} (torch {torch.__version__}{weight})")
    forced = os.environ.get(DEVICE_ENV)
    try:
        device = get_device()
    except Exception as exc:
        report.line("FAIL", "device", str(exc).splitlines()[0])
        report.errors.append(f"{exc}\n      Unset {DEVICE_ENV} or set it to 'cpu'.")
        return
    detail = str(device)
    if device.type == "cuda":
        detail += f" ({torch.cuda.get_device_name(device)}, {build})"
    elif device.type == "mps":
        detail += " (Apple GPU)"
        report.notes.append("If losses look wrong on MPS (a known PyTorch/macOS issue), run with "
                            f"{DEVICE_ENV}=cpu.")
    if forced:
        detail += f"  [forced by {DEVICE_ENV}={forced}]"
    report.line("ok", "device", detail)
    if gpu_build and not torch.cuda.is_available() and platform.system() != "Darwin":
        report.notes.append(gpu_build_without_gpu(build, weight))
    elif build == "CPU-only" and shutil.which("nvidia-smi"):
        report.notes.append("This machine has an NVIDIA driver (nvidia-smi), but this PyTorch is the CPU-only build: "
                            "for the GPU, install a CUDA build of PyTorch (setup/README.md, \"PyTorch builds\").")
    if device.type == "cpu":
        report.notes.append("No GPU in use: every chapter runs on CPU; set LLMFS_QUICK=1 for small, fast runs."
                            + ("" if gpu_build else " For an NVIDIA GPU, install a CUDA build of PyTorch (setup/README.md)."))


def gpu_build_without_gpu(build: str, weight: str) -> str:
    """The note for a CUDA or ROCm build that finds no GPU: recommend the CPU-only build only where it can be had."""
    kind = "NVIDIA" if build.startswith("CUDA") else "AMD"
    text = (f"This PyTorch is the {build} build{f' ({weight[2:]})' if weight else ''}, but no {kind} GPU is usable "
            "here (torch.cuda.is_available() is False); it runs on the CPU, only larger than it needs to be. If the "
            f"machine has an {kind} GPU, its driver is missing or too old. ")
    if host_reachable(PYTORCH_INDEX_HOST):
        return text + ("The CPU-only build is about 3 GB smaller than the ~6 GB CUDA set-up; it comes from PyTorch's "
                       f"own wheel index, {PYTORCH_INDEX_HOST}, which answers from here: in a new virtual environment, "
                       f"{CPU_INSTALL}")
    return text + (f"The CPU-only build comes from {PYTORCH_INDEX_HOST}, which cannot be reached from here (checked "
                   "just now), so requirements-cpu.txt would install this same build again: keep this one (it "
                   "works), or install torch from a mirror of PyTorch's CPU wheel index first (pip install torch "
                   "--index-url <mirror>), then pip install -r requirements.txt (setup/README.md).")


def check_tokenizer(report: Report) -> None:
    try:
        from ch02.tokenizer import END_OF_TEXT, get_gpt2_tokenizer

        enc = get_gpt2_tokenizer()
        ids = enc.encode(TOKENIZER_SAMPLE, allowed_special={END_OF_TEXT})
        problem = None
        if enc.n_vocab != 50257:
            problem = f"vocabulary has {enc.n_vocab} tokens, expected 50257"
        elif ids != TOKENIZER_IDS:
            problem = f"wrong ids for the test sentence: {ids}"
        elif enc.decode(ids) != TOKENIZER_SAMPLE:
            problem = "decoding does not give the test sentence back"
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        report.line("FAIL", "GPT-2 tokenizer", problem)
        report.errors.append("The bundled GPT-2 tokenizer (ch02/gpt2.tiktoken) is broken: restore the file "
                             "with `git checkout -- ch02/gpt2.tiktoken` and check that tiktoken >= 0.5 is installed.")
    else:
        report.line("ok", "GPT-2 tokenizer", "bundled ch02/gpt2.tiktoken loads; test sentence gives the right ids")


def check_folders(report: Report) -> set[str]:
    """LLMFS_OUTPUT_DIR, LLMFS_DATA_MIRROR, LLMFS_CACHE_DIR, when set, must be absolute paths (a relative one
    names another folder in a notebook, which starts in its chapter's folder). Returns the ones that are not."""
    try:
        from llmfs.env_paths import PATH_VARIABLES, env_path
        from llmfs.errors import UserError
    except Exception:
        return set()
    relative = set()
    for name in PATH_VARIABLES:
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        try:
            report.line("ok", name, str(env_path(name)))
        except UserError as exc:
            report.line("FAIL", name, f"{value} is a relative path")
            report.errors.append(str(exc))
            relative.add(name)
    return relative


def check_data(report: Report, download: bool = False, skip: set[str] = frozenset()) -> None:
    try:
        from llmfs.download import (
            CACHE_ENV,
            DATA_FILES,
            MIRROR_ENV,
            ChecksumError,
            cache_dir,
            data_file_status,
            get_data_file,
        )
    except Exception:
        return
    if {MIRROR_ENV, CACHE_ENV} & skip:
        print(f"  not checked: {' and '.join(sorted({MIRROR_ENV, CACHE_ENV} & skip))} must be an absolute path first")
        return
    mirror = os.environ.get(MIRROR_ENV)
    print(f"  data mirror ({MIRROR_ENV}): {mirror or 'not set'}")
    print(f"  data cache  ({CACHE_ENV}): {cache_dir()}")
    if mirror and not Path(mirror).expanduser().is_dir():
        report.warnings.append(f"{MIRROR_ENV}={mirror} is not a folder; it is ignored.")
    missing = []
    for name, spec in DATA_FILES.items():
        where = data_file_status(name)
        if where is None and download:
            try:
                get_data_file(name)
                where = data_file_status(name)
            except Exception as exc:
                report.line("FAIL", name, "download failed")
                report.errors.append(str(exc))
                continue
        if where is None:
            report.line("note", name, f"will download on first use ({spec.url})")
            missing.append(spec)
            continue
        try:
            path = get_data_file(name, download=False)  # verifies the sha256
        except ChecksumError as exc:
            report.line("FAIL", name, f"in the {where}, but its checksum does not match")
            report.errors.append(f"{exc}")
            continue
        except OSError as exc:  # e.g. a mirror file this user may not read
            report.line("FAIL", name, f"in the {where}, but it cannot be read")
            report.errors.append(f"{name}: {exc}")
            continue
        report.line("ok", name, f"{where}: {path}")
    hosts = sorted({urlparse(spec.url).hostname for spec in missing})
    unreachable = [h for h in hosts if not host_reachable(h)]
    if unreachable:
        report.errors.append(
            f"offline: {len(missing)} {'file' if len(missing) == 1 else 'files'} missing; "
            f"{', '.join(s.name for s in missing)} are in neither "
            f"the mirror ({MIRROR_ENV}: {mirror or 'not set'}) nor the cache ({cache_dir()}), and "
            f"{', '.join(unreachable)} cannot be reached, so the first notebook that needs them will fail. "
            f"Set {MIRROR_ENV} to a folder that holds them, or connect and run "
            "`python setup/check_env.py --download`.")


def host_reachable(host: str | None, timeout: float = 3.0) -> bool:
    """Can a TCP connection to `host`'s HTTPS port be opened within `timeout` seconds, the name lookup
    included (a proxy counts as yes)?"""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True
    import socket
    import threading

    opened, done = threading.Event(), threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                opened.set()
        except (OSError, TypeError, UnicodeError):
            pass
        finally:
            done.set()

    threading.Thread(target=connect, daemon=True).start()  # in a thread: a hanging DNS lookup is bounded too
    done.wait(timeout)
    return opened.is_set()


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python setup/check_env.py", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--download", action="store_true",
                        help="download the data files that are in neither the mirror nor the cache")
    args = parser.parse_args(argv)

    report = Report()
    print(f"Environment check for {REPO} ({platform.system()} {platform.machine()})\n")
    print("Python and packages:")
    check_python(report)
    check_packages(report)
    print("\nProject:")
    project_ok = check_project(report)
    if project_ok:
        check_device(report)
        check_tokenizer(report)
        print("\nFolders and data files:")
        relative = check_folders(report)
        check_data(report, download=args.download, skip=relative)

    for var in ("LLMFS_QUICK", "LLMFS_DEVICE", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        if os.environ.get(var):
            report.notes.append(f"{var}={os.environ[var]}")

    if report.notes:
        print("\nNotes:")
        for text in report.notes:
            print(f"  - {text}")
    if report.warnings:
        print("\nWarnings:")
        for text in report.warnings:
            print(f"  - {text}")
    if report.errors:
        print("\nProblems to fix:")
        for text in report.errors:
            print(f"  - {text}")
        print(f"\n{len(report.errors)} problem(s) found; see setup/README.md for more help.")
        return 1
    print("\nAll required checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
