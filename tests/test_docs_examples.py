"""Every Python block of docs/*.md runs as written and leaves ``git status`` clean, as the
README's examples and commands do (tests/test_readme_commands.py).

A fenced ``python`` block is executed, a ``pycon`` block run as a doctest, each in a fresh
namespace, from the root of a copy of the tree (so that paths such as ``data/`` resolve and
what a block writes lands in that copy, where git sees it). A block that needs a GPU or a
download is marked in the markdown, on the line before it, with ``<!-- not run: REASON -->``;
it is compiled and its imports are run, so that the names it uses still exist.
"""
import ast
import doctest
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^(?:<!-- (not run: [^\n]*?) -->\n)?```(python|pycon)\n(.*?)^```$", re.M | re.S)


def doc_blocks() -> list[tuple[str, int, str, str, str | None]]:
    """(file, line, language, code, reason not run or None) of every Python block in docs/."""
    out = []
    for path in sorted((REPO / "docs").glob("*.md")):
        text = path.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start(2)) + 1
            out.append((path.name, line, m.group(2), m.group(3), m.group(1)))
    return out


BLOCKS = doc_blocks()


def test_the_blocks_are_found_and_every_one_not_run_says_why():
    names = {f for f, *_ in BLOCKS}
    assert {"training.md", "video.md", "dcot.md", "plan-search.md"} <= names
    assert sum(reason is None for *_, reason in BLOCKS) >= 3
    assert all(reason is None or len(reason) > len("not run: ") + 5 for *_, reason in BLOCKS)
    fences = sum(len(re.findall(r"^```(?:python|pycon)$", p.read_text(), re.M)) for p in (REPO / "docs").glob("*.md"))
    assert fences == len(BLOCKS)


@pytest.mark.parametrize("name,line,lang,code,reason", BLOCKS, ids=[f"{b[0]}:{b[1]}" for b in BLOCKS])
def test_doc_python_block_runs_and_leaves_git_status_clean(clone, clone_status, monkeypatch, name, line, lang, code,
                                                          reason):
    monkeypatch.chdir(clone)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    where = f"docs/{name}:{line}"
    if reason is not None:
        source = code if lang == "python" else doctest.script_from_examples(code)
        tree = ast.parse(source, where)
        imports = ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], [])
        exec(compile(imports, where, "exec"), {})
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the tiny models are fastest on one thread
    try:
        if lang == "python":
            exec(compile(code, where, "exec"), {"__name__": "__main__"})
        else:
            test = doctest.DocTestParser().get_doctest(code, {}, where, where, line)
            runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
            runner.run(test)
            assert runner.summarize(verbose=False).failed == 0
    finally:
        torch.set_num_threads(threads)
    assert clone_status() == ""
