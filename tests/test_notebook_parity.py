"""Notebooks build the book's code, and what they build is the modules' code (fast: no execution).

Each main notebook defines its chapter's listings in code cells (`REQUIRED`). Every top-level
function or class a notebook defines under the name of a definition in its chapter's modules
must be the same code as the module's (docstrings and comments aside): the last definition of
the name counts, so a notebook may first build the book's version and then ours. And a notebook
never imports its own chapter's listing before it has built it.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from nbexec import REPO, code_sources, discover, python_only

# Main notebook -> the listings it must build (the book's names).
REQUIRED = {
    "ch02/ch02.ipynb": ["SimpleTokenizerV1", "SimpleTokenizerV2", "GPTDatasetV1", "create_dataloader_v1"],
    "ch03/ch03.ipynb": ["SelfAttention_v1", "SelfAttention_v2", "CausalAttention", "MultiHeadAttentionWrapper",
                        "MultiHeadAttention"],
    "ch04/ch04.ipynb": ["LayerNorm", "GELU", "FeedForward", "TransformerBlock", "GPTModel", "generate_text_simple"],
    "ch05/ch05.ipynb": ["text_to_token_ids", "token_ids_to_text", "calc_loss_batch", "calc_loss_loader",
                        "train_model_simple", "evaluate_model", "generate_and_print_sample", "plot_losses", "generate",
                        "assign", "load_weights_into_gpt"],
    "ch06/ch06.ipynb": ["download_and_unzip_spam_data", "create_balanced_dataset", "random_split", "SpamDataset",
                        "calc_accuracy_loader", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
                        "train_classifier_simple", "plot_values", "classify_review"],
    "ch07/ch07.ipynb": ["download_and_load_file", "format_input", "InstructionDataset", "custom_collate_draft_1",
                        "custom_collate_draft_2", "custom_collate_fn", "check_if_running", "query_model",
                        "generate_model_scores"],
    "appendix-A/code-part1.ipynb": ["NeuralNetwork", "ToyDataset"],
    "appendix-D/appendix-D.ipynb": ["find_highest_gradient", "train_model"],
    "appendix-E/appendix-E.ipynb": ["LoRALayer", "LinearWithLoRA", "replace_linear_with_lora"],
}

PACKAGE_DIRS = {"appendix-A": "appendix_a", "appendix-D": "appendix_d", "appendix-E": "appendix_e"}


def code_cells(path: Path) -> list[str]:
    """The code cells as Python (IPython magics and shell escapes blanked)."""
    return [python_only(src) for src in code_sources(json.loads(path.read_text(encoding="utf-8")))]


def strip_docstrings(node: ast.AST) -> ast.AST:
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body \
                and isinstance(n.body[0], ast.Expr) and isinstance(getattr(n.body[0], "value", None), ast.Constant) \
                and isinstance(n.body[0].value.value, str):
            n.body = n.body[1:] or [ast.Pass()]
    return node


def normalized(node: ast.AST) -> str:
    return ast.dump(strip_docstrings(node), include_attributes=False)


def module_definitions(folder: Path) -> dict[str, tuple[str, ast.AST]]:
    """Top-level functions and classes of the chapter's modules: name -> (module file, node)."""
    found: dict[str, tuple[str, ast.AST]] = {}
    for py in sorted(folder.glob("*.py")):
        tree = ast.parse(py.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found.setdefault(node.name, (py.name, node))
    return found


def notebook_definitions(path: Path) -> tuple[dict[str, tuple[int, ast.AST]], dict[str, int]]:
    """(name -> (cell index, node) of its last definition; name -> cell index of its first definition)."""
    last: dict[str, tuple[int, ast.AST]] = {}
    first: dict[str, int] = {}
    for i, src in enumerate(code_cells(path)):
        for node in ast.parse(src).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                last[node.name] = (i, node)
                first.setdefault(node.name, i)
    return last, first


def own_imports(path: Path) -> list[tuple[int, str]]:
    """(cell index, name) for every name the notebook imports from its own chapter's package."""
    package = PACKAGE_DIRS.get(path.parent.name, path.parent.name)
    out = []
    for i, src in enumerate(code_cells(path)):
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
                out += [(i, alias.name) for alias in node.names]
    return out


NOTEBOOKS = discover()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(REPO)) for p in NOTEBOOKS])
def test_notebook_definitions_are_the_modules_code(path):
    modules = module_definitions(path.parent)
    last, _ = notebook_definitions(path)
    differing = [f"{name} (module {modules[name][0]})" for name, (_, node) in last.items()
                 if name in modules and normalized(node) != normalized(modules[name][1])]
    assert not differing, f"{path.relative_to(REPO)} defines these differently from the module: {differing}"


@pytest.mark.parametrize("rel", sorted(REQUIRED))
def test_main_notebooks_build_their_listings_before_using_them(rel):
    path = REPO / rel
    last, first = notebook_definitions(path)
    missing = [name for name in REQUIRED[rel] if name not in last]
    assert not missing, f"{rel} does not build {missing}"
    early = sorted({name for cell, name in own_imports(path) if name in first and cell < first[name]}
                   | {name for cell, name in own_imports(path) if name in REQUIRED[rel] and name not in first})
    assert not early, f"{rel} imports {early} from its own chapter before building them"


def test_the_check_can_fail(tmp_path):
    """A changed line in a listing is caught; a changed docstring or comment is not."""
    a = ast.parse('def f(x):\n    """doc"""\n    return x + 1  # one\n').body[0]
    b = ast.parse('def f(x):\n    """other doc"""\n    return x + 1\n').body[0]
    c = ast.parse("def f(x):\n    return x + 2\n").body[0]
    assert normalized(a) == normalized(b) != normalized(c)


def private_imports(sources: list[str]) -> list[str]:
    """Underscore names a notebook imports (`from m import _x`, `import m._x`); dunders aside."""
    found = []
    for src in sources:
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                module, names = "", [alias.name for alias in node.names]
            else:
                continue
            for dotted in [module, *names]:
                if any(part.startswith("_") and not part.startswith("__") for part in dotted.split(".") if part):
                    found.append(f"{module}: {dotted}" if module and dotted != module else dotted)
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(REPO)) for p in NOTEBOOKS])
def test_notebooks_import_no_private_names(path):
    """A reader never needs an underscore name: what a notebook uses is public API."""
    found = private_imports(code_cells(path))
    assert not found, f"{path.relative_to(REPO)} imports private names: {found}"


def test_private_imports_are_found():
    assert private_imports(["from ch07.gpt_instruction_finetuning import _split_item, format_input\n"
                            "import torch._dynamo\nfrom __future__ import annotations\nimport os"]) == [
        "ch07.gpt_instruction_finetuning: _split_item", "torch._dynamo"]
