"""Reports hold no machine paths: every path a report would show is made relative to the repository, to the backend
search path ($DSV3_BACKENDS_PATH), to the installed package, or replaced by a placeholder ($TMPDIR, ~)."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATH_OPTIONS = ("--report", "--junit", "--compare", "--dir", "--package")


def _prefixes() -> list[tuple[str, str]]:
    """(machine prefix, what replaces it), longest prefix first so the most specific wins."""
    from core.registry import PATH_ENV

    pairs = [(str(ROOT), ".")]
    for part in os.environ.get(PATH_ENV, "").split(os.pathsep):
        if part:
            pairs.append((str(Path(part).resolve()), f"${PATH_ENV}"))
    sites = set(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    sites |= {site.getusersitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for s in sites:
        if s:
            pairs.append((str(Path(s).resolve()), "site-packages"))
            pairs.append((s, "site-packages"))
    pairs.append((str(Path(sys.prefix).resolve()), "$PREFIX"))
    pairs.append((str(Path(tempfile.gettempdir()).resolve()), "$TMPDIR"))
    pairs.append((tempfile.gettempdir(), "$TMPDIR"))
    home = os.path.expanduser("~")
    if home not in ("", "/", "~"):
        pairs.append((str(Path(home).resolve()), "~"))
        pairs.append((home, "~"))
    pairs = [(p, r) for p, r in pairs if p and p != "/"]
    return sorted(set(pairs), key=lambda pr: -len(pr[0]))


def scrub(text: str) -> str:
    """`text` with every machine prefix replaced (a path under the repository becomes relative to it)."""
    for prefix, replacement in _prefixes():
        if prefix in text:
            text = text.replace(prefix + os.sep, "" if replacement == "." else replacement + "/")
            text = text.replace(prefix, replacement)
    return text


def scrub_all(value):
    """`value` (JSON-like: dicts, lists, strings, numbers) with every string scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_all(v) for v in value]
    return value


def command_line(argv: list[str]) -> str:
    """The command as run, with the values of path options (--report, --junit, ...) made portable: relative to the
    repository when inside it, else only their last component after a `<dir>/` placeholder."""
    out, i = ["python -m conformance"], 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if eq and key in PATH_OPTIONS:
            out.append(f"{key}={portable_path(value)}")
        elif arg in PATH_OPTIONS and i + 1 < len(argv):
            out += [arg, portable_path(argv[i + 1])]
            i += 1
        else:
            out.append(scrub(arg))
        i += 1
    return " ".join(out)


def portable_path(value: str) -> str:
    path = Path(value).resolve()
    try:
        return str(path.relative_to(ROOT)) or "."
    except ValueError:
        return f"<dir>/{path.name}"
