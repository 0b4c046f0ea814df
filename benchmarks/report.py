"""Shared plumbing for benchmark scripts: environment facts and a section of docs/benchmarks.md.

Each benchmark owns one section, delimited by HTML comments, so several scripts can update the same
document without clobbering each other.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
_HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun that script to refresh it.\n"


def environment() -> dict[str, str]:
    """Device, software versions and date, to print above every table."""
    import numpy

    facts = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
    }
    commit = _git_commit()
    if commit:
        facts["commit"] = commit
    try:
        import torch

        facts["torch"] = torch.__version__
        if torch.cuda.is_available():
            facts["gpu"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return facts


def _git_commit() -> str | None:
    """The checkout's commit, marked when tracked files differ from it; None outside a git checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        changes = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" with local changes" if changes.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, path: Path = BENCHMARKS_MD,
                  facts: dict[str, str] | None = None, command: str | None = None) -> None:
    """Replace (or append) the section `name` of docs/benchmarks.md with `body`, headed by the
    environment and the exact command that produced it (this process's unless `facts`/`command`
    say otherwise, e.g. when rendering results measured on another machine)."""
    env = ", ".join(f"{k} {v}" for k, v in (facts or environment()).items())
    section = (
        f"<!-- BEGIN {name} -->\n## {title}\n\n"
        f"Environment: {env}\n\nCommand: `{command or command_line()}`\n\n{body.strip()}\n<!-- END {name} -->"
    )
    text = path.read_text() if path.exists() else _HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
