"""The shell commands of README.md and of the docs/*.md pages do not drift from the code: every ```bash block is
read, and each ``python main.py ...`` / ``torchrun ... main.py ...`` / ``python run_with_submitit.py ... -- ...``
command has its main.py flags parsed by main.get_args_parser(); each ``bash scripts/X.sh`` command is run with
DRY_RUN=1 (it prints its commands and runs nothing), and the main.py commands it prints are parsed too. Their
links point to files and headings that exist, and README links every docs page. Written against whatever the
pages hold: nothing here names a particular command."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from conftest import ROOT, child_env

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README] + DOCS  # every command in them runs from the repository root
_VAR = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def bash_blocks(text: str) -> List[str]:
    return re.findall(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> Iterator[str]:
    """Simple commands of a block: continuation lines joined, comments dropped, split at && / || / ;."""
    joined = re.sub(r"\\\n[ \t]*", " ", block)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*(?:&&|\|\||;)\s*", line):
            if part.strip():
                yield part.strip()


def split_command(command: str) -> Tuple[dict, List[str]]:
    """(leading VAR=value assignments, words); other $VARS become a dummy word so the words still parse."""
    words = shlex.split(_VAR.sub("dummy", command), comments=True)
    env = {}
    while words and _ASSIGNMENT.match(words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def main_argv(words: List[str]) -> Tuple[str, List[str]]:
    """('main', flags after main.py) / ('submitit', flags after run_with_submitit.py) / ('', [])."""
    for i, word in enumerate(words):
        name = os.path.basename(word)
        if name == "main.py":
            return "main", words[i + 1:]
        if name == "run_with_submitit.py":
            return "submitit", words[i + 1:]
    return "", []


def check_main_flags(kind: str, argv: List[str], where: str) -> None:
    import main
    from runtime.errors import UsageError

    if kind == "submitit":
        import run_with_submitit

        _, argv = run_with_submitit.parse_args(argv)
    try:
        main.get_args_parser().parse_args(argv)
    except UsageError as e:
        pytest.fail(f"{where}: main.py rejects the flags: {e}\n  {shlex.join(argv)}")


def page_commands(page: Path) -> List[Tuple[dict, List[str], str]]:
    """(env, words, 'PAGE: command') of every command in the page's shell blocks."""
    text = page.read_text(encoding="utf-8")
    name = page.relative_to(ROOT)
    return [(*split_command(c), f"{name}: {c}") for block in bash_blocks(text) for c in commands(block)]


def readme_commands() -> List[Tuple[dict, List[str], str]]:
    """The commands of README.md and of every docs/*.md page."""
    return [found for page in PAGES for found in page_commands(page)]


def script_of(words: List[str]) -> str:
    """'scripts/X.sh' of a `bash scripts/X.sh` (or `./scripts/X.sh`) command, else ''."""
    if len(words) >= 2 and words[0] in ("bash", "sh") and words[1].endswith(".sh"):
        return words[1]
    if words and words[0].endswith(".sh") and "/" in words[0]:
        return words[0]
    return ""


def handles_dry_run(script: Path) -> bool:
    """Whether the script (or a file it sources from its folder) reads DRY_RUN."""
    text = script.read_text(encoding="utf-8")
    sourced = [script.parent / m for m in re.findall(r"source\s+\S*?([A-Za-z0-9_.-]+\.sh)", text)]
    return any("DRY_RUN" in f.read_text(encoding="utf-8") for f in [script] + sourced if f.is_file())


def test_readme_has_commands():
    found = page_commands(README)
    assert any(main_argv(words)[0] for _, words, _ in found) or any(script_of(w) for _, w, _ in found), \
        "README.md has no main.py or scripts/*.sh command in a ```bash block"


def test_readme_main_commands_parse():
    for _, words, original in readme_commands():
        kind, argv = main_argv(words)
        if kind:
            check_main_flags(kind, argv, original)


def test_readme_files_exist():
    """Every script, requirements file or python file a README or docs command names is in the repository."""
    for _, words, original in readme_commands():
        paths = [w for w in words if re.fullmatch(r"[\w./-]+\.(?:py|sh|txt)", w) and not w.startswith("/")]
        if words[:2] == ["pip", "install"] and "-r" in words:
            paths.append(words[words.index("-r") + 1])
        for path in paths:
            assert (ROOT / path).is_file(), f"{path} does not exist: {original}"


def _readme_scripts() -> List[Tuple[dict, str, str]]:
    return [(env, script_of(words), original) for env, words, original in readme_commands() if script_of(words)]


def test_readme_script_commands_dry_run(tmp_path):
    checked = 0
    for env, script, original in _readme_scripts():
        path = ROOT / script
        assert path.is_file(), f"{original}: {script} does not exist"
        if not handles_dry_run(path):
            continue  # reported by test_readme_scripts_support_dry_run
        run_env = child_env()
        run_env.update(env)
        # a real DRY_RUN writes nothing; OUT still points into the test's folder in case one ever did
        run_env.update(DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
        proc = subprocess.run(["bash", str(path)], cwd=ROOT, env=run_env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"DRY_RUN=1 {original}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        for line in proc.stdout.splitlines():
            try:
                _, words = split_command(line)
            except ValueError:
                continue  # not a shell command line (a message)
            kind, argv = main_argv(words)
            if kind:
                check_main_flags(kind, argv, f"DRY_RUN=1 {original} printed")
                checked += 1
        assert not list((tmp_path / "out").rglob("*")), f"DRY_RUN=1 {original} wrote files"
    if _readme_scripts() and any(handles_dry_run(ROOT / s) for _, s, _ in _readme_scripts()):
        assert checked, "the README's scripts printed no main.py command under DRY_RUN=1"


def test_readme_scripts_support_dry_run():
    """A README script without a DRY_RUN mode cannot be checked without running it for real (minutes to
    days); every script the README tells users to run must print its commands under DRY_RUN=1."""
    missing = sorted({script for _, script, _ in _readme_scripts()
                      if (ROOT / script).is_file() and not handles_dry_run(ROOT / script)})
    assert not missing, f"README runs {missing}, which ignore DRY_RUN=1 (they would really run)"


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(text: str) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation but '-' and '_' dropped, spaces -> '-'."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # a '# comment' in a code block is no heading
    titles = re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


def links(page: Path) -> List[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # not http(s):, mailto:


def test_links_point_to_files_and_headings_that_exist():
    for page in PAGES + [ROOT / "benchmarks" / "README.md"]:
        for target in links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.relative_to(ROOT)} links {target}: {path} does not exist"
            if anchor and dest.suffix == ".md":
                assert anchor in heading_anchors(dest.read_text(encoding="utf-8")), \
                    f"{page.relative_to(ROOT)} links {target}: no such heading in {dest.name}"


def test_readme_links_every_docs_page():
    assert DOCS, "docs/ has no page"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_the_link_checks_catch_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page: `--flag x`\n\n```bash\n# not a heading\n```\n[ok](#a-page---flag-x) [bad](#not-a-heading) "
                    "[web](https://example.com) [file](gone.md)\n")
    assert heading_anchors(page.read_text()) == {"a-page---flag-x"}
    assert links(page) == ["#a-page---flag-x", "#not-a-heading", "gone.md"]


def test_the_checks_catch_a_drifted_command():
    """The extraction joins continuation lines and substitutes $VARS, and a renamed flag is caught."""
    block = bash_blocks("x\n```bash\nNGPUS=2 torchrun --nproc_per_node 2 main.py --model m \\\n"
                        "    --data-path $DATA --toe-rate 0.5  # a flag that does not exist\n```\n")[0]
    (command,) = list(commands(block))
    env, words = split_command(command)
    kind, argv = main_argv(words)
    assert env == {"NGPUS": "2"} and kind == "main"
    assert argv == ["--model", "m", "--data-path", "dummy", "--toe-rate", "0.5"]
    with pytest.raises(pytest.fail.Exception, match="--toe-rate"):
        check_main_flags(kind, argv, "example")
    check_main_flags(kind, argv[:4], "example")  # without it the line parses
