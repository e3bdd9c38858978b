"""The README and docs/ say what works: the README's inferlet runs, every `python -m` module and
`make` target they show exists, and every file or folder of the repository they name is there."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from cluster.runtime.inferlet_host import InferletHost
from helpers import CHAT_QUESTION

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_FOLDERS = ("cluster", "workers", "inferlets", "deploy", "loadtests", "tests", "docs")


def test_the_readme_inferlet_runs(tmp_path, _executor_fp32):
    snippet = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert "def main(args" in snippet
    program = tmp_path / "my_inferlet.py"
    program.write_text(snippet)
    with InferletHost(_executor_fp32) as host:
        outcome = host.launch(program, [CHAT_QUESTION]).wait(180)
        host.worker.pages.check_idle()
    assert outcome.ok, outcome.error
    assert len(outcome.messages) > 1 and "".join(outcome.messages).strip()


def commands(pattern: str) -> set[tuple[str, str]]:
    """(doc, match) of every match in the docs, `a.{b,c}` expanded to `a.b` and `a.c`."""
    found = set()
    for doc in DOCS:
        for match in re.findall(pattern, doc.read_text()):
            head, _, alternatives = match.partition("{")
            found |= {(doc.name, head + alt) for alt in alternatives.rstrip("}").split(",")} if alternatives \
                else {(doc.name, match)}
    return found


@pytest.mark.parametrize("doc, module", sorted(commands(r"python -m ([\w.]+(?:\{[\w,]+\})?)")))
def test_python_m_modules_exist(doc, module):
    if module in ("pytest", "grpc_tools.protoc", "vllm.entrypoints.openai.api_server"):
        return  # other projects' modules
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{doc} shows `python -m {module}`, which does not exist"
    if spec.submodule_search_locations:  # a package runs its __main__
        spec = importlib.util.find_spec(f"{module}.__main__")
        assert spec is not None, f"{doc} shows `python -m {module}`, a package without __main__"
    assert 'if __name__ == "__main__"' in Path(spec.origin).read_text(), f"{module} cannot run as a program"


@pytest.mark.parametrize("doc, target", sorted(commands(r"\bmake (\w[\w-]*)")))
def test_make_targets_exist(doc, target):
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{doc} shows `make {target}`, not in the Makefile"


def test_named_files_exist():
    named = commands(rf"(?<![\w/.~$])((?:{'|'.join(TOP_FOLDERS)})/[\w/.\-]*\w)")
    assert len(named) > 40
    missing = sorted(f"{doc}: {path}" for doc, path in named if not (ROOT / path).exists()
                     and not (ROOT / re.sub(r"\.\w+$", "", path)).exists())
    assert not missing, "the docs name files that are not there:\n" + "\n".join(missing)
