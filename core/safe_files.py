"""Reading files that came from strangers, and writing outputs all-or-nothing: the one place every path goes through.

Containment. A name found inside a checkpoint (an index's shard names, a tokenizer file) is resolved inside the
checkpoint's *root*, computed once from the directory the user named: its real path (symlinks resolved), or, when
that directory is a Hugging Face cache snapshot (`<repo>/snapshots/<revision>` with `<repo>/blobs` beside it), the
real path of `<repo>`, so the cache's symlink farm (`snapshots/<rev>/x -> ../../blobs/<hash>`) stays allowed. A name
that is absolute, contains a `..` component, a backslash or a NUL, or whose real path (after every symlink) leaves
the root is refused.

Only regular files are opened: the file is stat'ed before it is opened (a FIFO, device or socket is refused before
any read, so nothing can block), opened non-blocking, and fstat'ed again (the same regular file, or refused).

Bounded parsing. JSON and YAML are size-checked before they are read (the size from fstat, and never more than
the limit + 1 bytes read) and depth-checked before they are built (JSON: a linear pre-scan of the bracket nesting
outside strings; YAML: the composer counts its nesting), so no file can cause a RecursionError or an unbounded
read. Duplicate keys in a JSON object are refused. YAML anchors and aliases are refused (no alias bombs).

Honest messages. Every name or value that comes from a file is shown through `quote_name` / `quote_value`
(repr-style escaping of newlines and control characters, truncated), so a message stays exactly one line and a
crafted name cannot forge another line.

Outputs. `StagedFile` writes to a hidden temporary name in the target's directory and renames it into place only
on `commit()`; `write_files_atomically` does the same for a set of files in one directory (all of them or none).
Failures (an existing directory in the way, a full disk, a read-only place) are one-line UserErrors and leave no
temporary file behind.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

from core.errors import CheckpointError, UserError

KiB, MiB = 1 << 10, 1 << 20
MAX_CONFIG_BYTES = 4 * MiB  # config.json, generation_config.json (DeepSeek-V3's is 1.7 KiB)
MAX_INDEX_BYTES = 32 * MiB  # model.safetensors.index.json (DeepSeek-V3's is 8.9 MiB)
MAX_TOKENIZER_BYTES = 64 * MiB  # tokenizer.json (DeepSeek-V3's is 7.5 MiB)
MAX_TOKENIZER_CONFIG_BYTES = 16 * MiB  # tokenizer_config.json (chat templates, added tokens)
MAX_REPORT_BYTES = 32 * MiB  # a conformance report.json given to --compare
MAX_MANIFEST_BYTES = 1 * MiB  # a backend's manifest.yaml
MAX_DEPTH = 32  # nesting of any JSON/YAML we read (the deepest real one, a report, nests 4)
NAME_SHOWN = 200  # characters of a quoted name shown in a message


# -- honest messages ---------------------------------------------------------------------------------------------

def quote_name(name: object, limit: int = NAME_SHOWN) -> str:
    """A name from a file, as it may appear in a one-line message: repr-quoted (newlines, control and non-printable
    characters escaped), cut to about `limit` characters."""
    text = repr(str(name)) if not isinstance(name, str) else repr(name)
    return text if len(text) <= limit else text[:limit] + "...'"


_VALUE_REPR = reprlib.Repr()
_VALUE_REPR.maxlevel, _VALUE_REPR.maxstring, _VALUE_REPR.maxother = 3, 80, 80
_VALUE_REPR.maxlist = _VALUE_REPR.maxdict = _VALUE_REPR.maxtuple = 6


def quote_value(value: object) -> str:
    """A value from a file (any JSON/YAML value) shown in a one-line message: repr-like, depth- and length-bounded."""
    try:
        return _VALUE_REPR.repr(value)
    except Exception:  # a value whose repr itself fails is shown by type only
        return f"<{type(value).__name__}>"


_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(text: object) -> str:
    """`text` with every line break and control character escaped (for messages of third-party exceptions)."""
    return _LINE_BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def os_reason(e: BaseException) -> str:
    """The short reason of an OSError (its strerror), or the one-line text of any other exception."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return one_line(e) or type(e).__name__


# -- containment -------------------------------------------------------------------------------------------------

def containment_root(directory: Path) -> Path:
    """The real directory every file of the checkpoint at `directory` must resolve inside (module docstring)."""
    real = Path(os.path.realpath(directory))
    repo = real.parent.parent
    if real.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return real


def resolve_inside(root: Path, directory: Path, name: object, what: str, error: type[Exception] = CheckpointError
                   ) -> Path:
    """The real path of file `name` (a relative name found in `what`) under `directory`, refused unless it stays
    inside `root` (a `containment_root`)."""
    if not isinstance(name, str) or not name:
        raise error(f"{what}: a file name must be a non-empty string, got {quote_value(name)}")
    parts = name.split("/")
    if "\x00" in name or "\\" in name or name.startswith("/") or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise error(f"{what}: refuses file name {quote_name(name)} (absolute, '..' or odd characters): every file "
                    f"must lie inside {quote_name(str(root))}")
    real = Path(os.path.realpath(Path(directory) / name))
    if real != root and root not in real.parents:
        raise error(f"{what}: file {quote_name(name)} resolves to {quote_name(str(real))}, outside the checkpoint "
                    f"{quote_name(str(root))} (a symlink leaving it?)")
    return real


# -- regular files only ------------------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: Path, what: str | None = None, error: type[Exception] = CheckpointError) -> int:
    """An fd (O_RDONLY) of the regular file `path`; anything else is refused before it is opened for reading."""
    shown = what or quote_name(str(path))
    try:
        before = os.stat(path)
    except OSError as e:
        raise error(f"{shown}: cannot read ({os_reason(e)})") from None
    if not stat.S_ISREG(before.st_mode):
        raise error(f"{shown}: is {_kind(before.st_mode)}, not a regular file; refused")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{shown}: cannot read ({os_reason(e)})") from None
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise error(f"{shown}: changed while it was being opened; refused")
    return fd


def check_regular(path: Path, what: str | None = None, error: type[Exception] = CheckpointError) -> int:
    """Refuse anything but a regular file at `path` (no read); returns its size in bytes."""
    fd = open_regular(path, what, error)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_bytes(path: Path, limit: int, what: str | None = None, error: type[Exception] = CheckpointError) -> bytes:
    """The whole regular file `path`, refused when it holds more than `limit` bytes (checked before reading, and
    never more than `limit` + 1 bytes are read)."""
    shown = what or quote_name(str(path))
    fd = open_regular(path, what, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{shown}: {size} bytes exceeds the limit of {limit} bytes for this file; refused")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise error(f"{shown}: grew beyond the limit of {limit} bytes while being read; refused")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{shown}: cannot read ({os_reason(e)})") from None
    finally:
        os.close(fd)


# -- bounded JSON and YAML ---------------------------------------------------------------------------------------

# A JSON string, or an unterminated one running to the end (possessive: linear time on any input).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\(?:.|\Z)[^"\\]*+)*+(?:"|\Z)', re.S)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_INNERMOST_PAIR = re.compile(rb"[\[{][\]}]")


def json_too_deep(data: bytes, max_depth: int) -> bool:
    """Whether JSON text `data` nests arrays/objects more than `max_depth` deep (brackets inside strings do not
    count). Linear in C: a cheap bound first; then strings are cut out and innermost bracket pairs are removed
    level by level (at most `max_depth` + 1 passes). Unbalanced text counts its unclosed brackets as nesting."""
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    skeleton = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for level in range(max_depth):
        if not skeleton:
            return False
        stripped = _INNERMOST_PAIR.sub(b"", skeleton)
        if stripped == skeleton:  # only `]...][...[` is left
            return level + skeleton.count(b"[") + skeleton.count(b"{") > max_depth
        skeleton = stripped
    return bool(skeleton)


def _no_duplicates(source: str, error: type[Exception]) -> Callable[[list], dict]:
    def build(pairs: list) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{source}: duplicate key {quote_name(key)} in a JSON object; refused")
            out[key] = value
        return out
    return build


def parse_json(data: bytes, source: str, max_depth: int = MAX_DEPTH, error: type[Exception] = CheckpointError
               ) -> Any:
    """Parse JSON bytes (UTF-8) with a nesting limit, refusing duplicate keys; every failure is one `error` line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if json_too_deep(data, max_depth):
        raise error(f"{source}: nests more than {max_depth} levels deep; refused")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(source, error))
    except json.JSONDecodeError as e:
        raise error(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer literal with more digits than Python converts
        raise error(f"{source}: invalid JSON ({one_line(e)})") from None


def read_json_file(path: Path, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH,
                   error: type[Exception] = CheckpointError, what: str | None = None) -> Any:
    """Read a JSON file safely: a regular file only, at most `max_bytes`, nesting at most `max_depth`, no duplicate
    keys. Failures raise `error` (a UserError subclass by default: CheckpointError) with one line naming the file.
    The readers of config.json, the index, tokenizer_config.json and generation_config.json all call this."""
    shown = what or quote_name(str(path))
    return parse_json(read_bytes(path, max_bytes, shown, error), shown, max_depth, error)


def read_yaml_file(path: Path, max_bytes: int = MAX_MANIFEST_BYTES, max_depth: int = MAX_DEPTH,
                   error: type[Exception] = UserError, what: str | None = None) -> Any:
    """Read a YAML file safely (safe loader; size and depth limits; anchors and aliases refused)."""
    import yaml

    shown = what or quote_name(str(path))
    data = read_bytes(path, max_bytes, shown, error)

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise error(f"{shown}: YAML aliases are not allowed; refused")
            event = self.peek_event()
            if getattr(event, "anchor", None) is not None:
                raise error(f"{shown}: YAML anchors are not allowed; refused")
            self.depth += 1
            if self.depth > max_depth:
                raise error(f"{shown}: nests more than {max_depth} levels deep; refused")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{shown}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{shown}: invalid YAML ({one_line(first)})") from None
    except (ValueError, TypeError, RecursionError) as e:
        raise error(f"{shown}: invalid YAML ({one_line(e)})") from None
    finally:
        loader.dispose()


# -- outputs, all or nothing -------------------------------------------------------------------------------------

def check_output_target(path: Path, option: str, directory: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: `path` (a file, or with `directory` a directory
    that may not exist yet) must not be the wrong kind of thing, and its nearest existing parent must be a
    writable directory. Nothing is created."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if directory and not path.is_dir():
            raise UserError(f"{option}: {quote_name(str(path))} exists and is not a directory")
        if not directory and not path.is_file():
            raise UserError(f"{option}: {quote_name(str(path))} exists and is not a regular file")
    parent = path if directory and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        if not directory:
            raise UserError(f"{option}: directory {quote_name(str(parent))} does not exist")
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{option}: {quote_name(str(parent))} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option}: {quote_name(str(parent))} is not writable")


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.fsync(fd)


def _temp_in(directory: Path, name: str, option: str) -> tuple[int, str]:
    try:
        return tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"{option}: cannot write in {quote_name(str(directory))} ({os_reason(e)})") from None


class StagedFile:
    """An output file written now under a hidden temporary name beside `path` and renamed into place by
    `commit()` (after the run succeeded); `discard()` (or an exception in a `with` block) removes it."""

    def __init__(self, path: Path, option: str):
        self.path, self.option = Path(path), option
        self.tmp: str | None = None

    def write(self, data: bytes) -> None:
        check_output_target(self.path, self.option)
        fd, self.tmp = _temp_in(self.path.parent, self.path.name, self.option)
        try:
            _write_fd(fd, data)
        except OSError as e:
            self.discard()
            raise UserError(f"{self.option}: cannot write {quote_name(str(self.path))} ({os_reason(e)})") from None
        finally:
            os.close(fd)

    def write_with(self, writer: Callable[[str], None], errors: tuple[type[BaseException], ...] = ()) -> None:
        """Let `writer(temporary_path)` write the file (e.g. safetensors' save_file); OSError and `errors` become
        one-line UserErrors and remove the temporary file."""
        check_output_target(self.path, self.option)
        fd, self.tmp = _temp_in(self.path.parent, self.path.name, self.option)
        os.close(fd)
        try:
            writer(self.tmp)
        except (OSError, *errors) as e:
            self.discard()
            raise UserError(f"{self.option}: cannot write {quote_name(str(self.path))} ({os_reason(e)})") from None
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        if self.tmp is None:
            return
        try:
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.discard()
            raise UserError(f"{self.option}: cannot write {quote_name(str(self.path))} ({os_reason(e)})") from None
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None

    def __enter__(self) -> "StagedFile":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.discard()


def write_files_atomically(directory: Path, files: dict[str, bytes], option: str) -> None:
    """Write every file of `files` (name -> bytes) into `directory`: all of them or none. A new directory is
    written under a hidden temporary name beside it and renamed into place; in an existing directory each file is
    staged under a temporary name first, the renames come only after every file was written, and the files they
    replace are kept aside until every rename succeeded (a failed rename puts them all back)."""
    directory = Path(directory)
    check_output_target(directory, option, directory=True)
    if not directory.exists():
        parent = directory.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}.", suffix=".tmp"))
        except OSError as e:
            raise UserError(f"{option}: cannot create {quote_name(str(directory))} ({os_reason(e)})") from None
        try:
            for name, data in files.items():
                fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    _write_fd(fd, data)
                finally:
                    os.close(fd)
            os.chmod(staging, 0o755)
            os.rename(staging, directory)
        except OSError as e:
            for p in staging.glob("*"):
                p.unlink(missing_ok=True)
            staging.rmdir()
            raise UserError(f"{option}: cannot write {quote_name(str(directory))} ({os_reason(e)})") from None
        return
    staged = [StagedFile(directory / name, option) for name in files]
    backups: list[tuple[str, Path]] = []  # (hidden copy of a file being replaced, its path)
    committed: list[Path] = []
    try:
        for s, data in zip(staged, files.values()):
            s.write(data)
        for s in staged:  # the previous files move aside first, so a failed rename can put every one back
            if s.path.exists():
                fd, backup = _temp_in(directory, s.path.name, option)
                os.close(fd)
                os.replace(s.path, backup)
                backups.append((backup, s.path))
            s.commit()
            committed.append(s.path)
    except BaseException:
        for s in staged:
            s.discard()
        for path in committed:
            path.unlink(missing_ok=True)
        for backup, path in backups:
            os.replace(backup, path)
        raise
    for backup, _ in backups:
        os.unlink(backup)
