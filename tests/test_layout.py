"""House rules the code itself must keep: private JAX in two modules only, and a repository that
refers to nothing outside itself."""
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRIVATE_JAX = "jax." + "_src"  # spelled in two parts so that this file does not match itself
COMPAT_MODULES = {"passes/_compat.py", "pallas_kernels/_pallas_compat.py"}


def _repository_files(*suffixes):
    """Tracked files and untracked ones git does not ignore, relative to the root."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = sorted({p for p in out.splitlines() if (ROOT / p).is_file()})
    return [p for p in files if p.endswith(suffixes)] if suffixes else files


def test_private_jax_only_in_the_compat_modules():
    # Every difference between JAX versions, and every reach into jax's private modules, sits in
    # passes/_compat.py (the compiler) or pallas_kernels/_pallas_compat.py (the kernels).
    spellings = re.compile(r"jax\._src\b|from\s+jax\s+import\s+[^\n]*\b_src\b|jax\s*,\s*['\"]_src")
    offenders = []
    for path in _repository_files(".py", ".ipynb", ".sh"):
        if path in COMPAT_MODULES or path == "tests/test_layout.py":
            continue
        text = (ROOT / path).read_text(errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if spellings.search(line):
                offenders.append(f"{path}:{n}: {line.strip()}")
    assert not offenders, (f"{PRIVATE_JAX} outside {sorted(COMPAT_MODULES)}; add what is needed "
                           f"there instead:\n" + "\n".join(offenders))


# Files that once lived outside the repository, and words for hardware held on loan.
_OUTSIDE = re.compile("|".join([r"ANCHORS\.md", r"docs_experiments", r"\.\./shared",
                                r"\blent\b"]))
# Outside docs/, the design document is docs/DESIGN.md; a bare DESIGN.md meant one elsewhere.
_BARE_DESIGN = re.compile(r"(?<![\w/])DESIGN\.md")


def test_nothing_refers_outside_the_repository():
    offenders = []
    for path in _repository_files(".py", ".md", ".sh", ".ipynb", ".toml", ".txt", ".cfg"):
        if path == "tests/test_layout.py":
            continue
        for n, line in enumerate((ROOT / path).read_text(errors="replace").splitlines(), 1):
            if _OUTSIDE.search(line) or (not path.startswith("docs/")
                                         and _BARE_DESIGN.search(line)):
                offenders.append(f"{path}:{n}: {line.strip()}")
    assert not offenders, "references outside the repository:\n" + "\n".join(offenders)


def _markdown_files():
    return [p for p in _repository_files(".md")]


def test_markdown_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for path in _markdown_files():
        base = (ROOT / path).parent
        for target in link.findall((ROOT / path).read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            if not (base / target).exists():
                broken.append(f"{path}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_readme_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/DESIGN.md", "docs/BENCHMARKS.md", "docs/writing_passes.md",
                "docs/writing_kernels.md"):
        assert (ROOT / doc).is_file(), doc
        assert f"]({doc})" in readme, f"README.md does not link {doc}"


MAX_LINES = 750


def test_fusion_and_kernel_modules_stay_short():
    # A module past this reads as two; split it where the data flow splits (see
    # passes/fusion/_softmax.py, _masks.py).
    long = []
    for path in _repository_files(".py"):
        if path.startswith(("passes/fusion/", "pallas_kernels/")):
            n = len((ROOT / path).read_text().splitlines())
            if n > MAX_LINES:
                long.append(f"{path}: {n} lines")
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_pattern_has_no_op():
    # The pattern matching one equation is `pattern.Prim`; `Op` is the kernel dispatcher
    # `pallas_kernels.Op`, and one name must not mean both.
    import passes.pattern as pattern

    assert not hasattr(pattern, "Op") and "Op" not in pattern.__all__
    assert "Prim" in pattern.__all__
