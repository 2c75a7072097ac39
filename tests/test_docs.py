"""Every ```python block of README.md and docs/*.md runs as written, and prints what the text says.

The blocks of one file run in order in one namespace, as a reader would paste them. Where the text
states an output, the test compares what was printed:

- a `print(...)` statement with a trailing comment states its output: `print(x)  # [200.]`.
  The comment is the printed text, or starts with it followed by a separator and a remark
  (`# [200.], the original gives inf`). A print whose output is not stated has no comment;
- a ```text block right after a python block states everything that block prints.
"""
import ast
import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
SEPARATORS = (",", ";", " (", " -", "  ", " --")


def blocks(path):
    """(language, code, stated output of the whole block or None) for each fenced block."""
    text = path.read_text()
    found = [(m.group(1), m.group(2), m.start(), m.end()) for m in FENCE.finditer(text)]
    out = []
    for i, (lang, code, _, end) in enumerate(found):
        if lang != "python":
            continue
        stated = None
        if i + 1 < len(found) and found[i + 1][0] == "text" and \
                not text[end:found[i + 1][2]].strip():
            stated = found[i + 1][1]
        out.append((code, stated))
    return out


def _stated_output(source_lines, stmt):
    """The output a print statement's trailing comment states, or None."""
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == "print"):
        return None
    last = source_lines[stmt.end_lineno - 1]
    tail = last[stmt.end_col_offset:]
    m = re.match(r"\s*#\s?(.*)$", tail)
    return m.group(1).rstrip() if m else None


def _agrees(printed: str, stated: str) -> bool:
    printed = printed.rstrip("\n")
    if printed == stated:
        return True
    return stated.startswith(printed) and stated[len(printed):].startswith(SEPARATORS)


def _lines(text):
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def run_block(code, namespace, where):
    """Run `code` statement by statement; returns everything printed and the mismatches."""
    tree = ast.parse(code, filename=where)
    source_lines = code.splitlines()
    printed_all, problems = [], []
    for stmt in tree.body:
        module = ast.Module(body=[stmt], type_ignores=[])
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(module, where, "exec"), namespace)
        printed = buffer.getvalue()
        printed_all.append(printed)
        stated = _stated_output(source_lines, stmt)
        if stated is not None and not _agrees(printed, stated):
            problems.append(f"{where}, line {stmt.lineno}: `{source_lines[stmt.lineno - 1].strip()}`"
                            f" printed {printed.rstrip()!r}, the text says {stated!r}")
    return "".join(printed_all), problems


def test_the_docs_have_examples():
    names = {str(p.relative_to(ROOT)) for p in DOCS}
    assert {"README.md", "docs/DESIGN.md", "docs/writing_passes.md",
            "docs/writing_kernels.md"} <= names
    assert sum(len(blocks(p)) for p in DOCS) >= 8


def test_the_output_parser():
    code = "x = 2\nprint(x)  # 2\nprint(x + 1)  # 3, a remark\nprint(x)\nprint(x)  # 5\n"
    printed, problems = run_block(code, {}, "example")
    assert printed == "2\n3\n2\n2\n"
    assert len(problems) == 1 and "line 5" in problems[0]
    assert not _agrees("[1", "[1.]")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_examples_run_and_print_what_they_say(path):
    namespace = {"__name__": f"docs_{path.stem}"}
    problems = []
    for i, (code, stated) in enumerate(blocks(path)):
        where = f"{path.relative_to(ROOT)} python block {i}"
        printed, found = run_block(code, namespace, where)
        problems += found
        if stated is not None and _lines(printed) != _lines(stated):
            problems.append(f"{where} printed\n{printed}\nthe text block after it says\n{stated}")
    assert not problems, "\n".join(problems)
