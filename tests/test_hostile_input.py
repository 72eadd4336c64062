"""Careless input (issue 11): sampling at any temperature, prompts that are not UTF-8, outputs written all or
nothing, broken backend plugins, and a --compare report validated before anything runs."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import core.safe_files
from core.errors import UserError
from core.generate import Sampler
from core.safe_files import write_files_atomically
from tests.helpers import ROOT, refused, run_main




def output_ids(*args) -> list[int]:
    r = run_main("core.run", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])["output_ids"]


# -- sampling ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [5e-324, 1e-45, 1e-30, 1e-12])
def test_tiny_temperature_is_greedy_never_nan(temperature):
    logits = torch.randn(4, 1000) * 30
    s = Sampler(temperature, seed=int(torch.randint(0, 2 ** 31, ())))
    p = s.probs(logits)
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(4))
    assert s.pick(logits) == logits.argmax(-1).tolist()


def test_huge_temperature_is_a_valid_distribution():
    logits = torch.randn(2, 300)
    p = Sampler(1e300, 0).probs(logits)
    assert torch.isfinite(p).all() and torch.allclose(p, torch.full_like(p, 1 / 300))


def test_tiny_temperature_on_the_cli_gives_the_greedy_tokens():
    args = ("--prompt-ids", "0,40,41,42,43", "--max-new-tokens", "6", "--ignore-eos")
    assert output_ids(*args, "--temperature", "1e-30") == output_ids(*args)


# -- text input --------------------------------------------------------------------------------------------------

def test_prompt_that_is_not_utf8_is_encoded_with_replacement_characters():
    """Invalid UTF-8 from argv becomes U+FFFD, as the tokenizer layer decodes every text input
    (core.engine.tokenizer.clean_text), never a traceback."""
    from core.tokenizer import ByteTokenizer

    r = subprocess.run([sys.executable, "-m", "core.run", "--prompt", b"caf\xe9 \xff", "--max-new-tokens", "1",
                        "--json"], cwd=ROOT, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ids = json.loads(r.stdout.decode().strip().splitlines()[-1])["prompt_ids"]
    assert ids == ByteTokenizer().encode("caf\ufffd \ufffd")


def test_a_tokenizer_that_cannot_encode_is_one_line():
    from core.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(None)

    class Picky:
        def encode(self, text, add_special_tokens=True):
            raise ValueError("unmappable character\nat 3")

    tok.backend = Picky()
    with pytest.raises(UserError) as e:
        tok.encode("abc")
    assert "\n" not in str(e.value) and "unmappable" in str(e.value)


def test_unicode_prompt_is_encoded_as_the_byte_tokenizer_does():
    from core.tokenizer import ByteTokenizer

    r = run_main("core.run", "--json", "--prompt", "naïve ☃ \u2028 end", "--max-new-tokens", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["prompt_ids"] == ByteTokenizer().encode("naïve ☃ \u2028 end")


# -- outputs -----------------------------------------------------------------------------------------------------

def test_logits_out_onto_a_directory_or_a_read_only_place(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    refused(run_main("core.run", "--logits-out", str(tmp_path / "d.safetensors")), "--logits-out",
            "not a regular file")
    refused(run_main("core.run", "--prompt-ids", "0,5", "--max-new-tokens", "1", "--logits-out",
                     "/proc/self/x.safetensors"), "--logits-out")


def test_logits_out_left_nowhere_when_the_run_fails_after_it(tmp_path, monkeypatch):
    import core.run

    def fails(*a, **k):
        raise UserError("generation failed on purpose")

    monkeypatch.setattr(core.run, "_generate_one", fails)
    refused(run_main("core.run", "--prompt-ids", "0,5", "--logits-out", str(tmp_path / "l.safetensors")),
            "on purpose")
    assert list(tmp_path.iterdir()) == []


def test_logits_out_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    def small_files():  # the file-size limit makes writes fail as a full disk does (EFBIG instead of ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "logits.safetensors"
    r = subprocess.run([sys.executable, "-m", "core.run", "--prompt-ids", ",".join(["7"] * 20),
                        "--max-new-tokens", "1", "--logits-out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, preexec_fn=small_files)
    refused(r, "--logits-out", "cannot write")
    assert list(tmp_path.iterdir()) == []


def fail_second_write(monkeypatch):
    real, calls = core.safe_files._write_fd, []

    def write(fd, data):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(core.safe_files, "_write_fd", write)


def test_report_files_all_or_none(tmp_path, monkeypatch):
    fail_second_write(monkeypatch)
    with pytest.raises(UserError, match="No space left"):
        write_files_atomically(tmp_path / "new", {"report.json": b"{}", "report.md": b"# r"}, "--report")
    assert list(tmp_path.iterdir()) == [], "no directory and no staging directory left"
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text("previous")
    fail_second_write(monkeypatch)
    with pytest.raises(UserError, match="No space left"):
        write_files_atomically(old, {"report.json": b"{}", "report.md": b"# r"}, "--report")
    assert [p.name for p in old.iterdir()] == ["report.json"] and (old / "report.json").read_text() == "previous"


def test_report_in_an_existing_directory_is_all_or_none_when_a_rename_fails(tmp_path, monkeypatch):
    """Both new files are written; the second rename fails: the first file's previous version comes back."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text("previous json")
    (old / "report.md").write_text("previous md")
    real, renames = os.replace, []

    def replace(src, dst):
        if str(src).endswith(".tmp") and Path(dst).name.startswith("report"):
            renames.append(dst)
            if len(renames) == 2:
                raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(core.safe_files.os, "replace", replace)
    with pytest.raises(UserError, match="Input/output error"):
        write_files_atomically(old, {"report.json": b"{}", "report.md": b"# r"}, "--report")
    monkeypatch.undo()
    assert sorted(p.name for p in old.iterdir()) == ["report.json", "report.md"], "no temporary file left"
    assert (old / "report.json").read_text() == "previous json" and (old / "report.md").read_text() == "previous md"
    write_files_atomically(old, {"report.json": b"{}", "report.md": b"# r"}, "--report")
    assert (old / "report.json").read_text() == "{}" and sorted(p.name for p in old.iterdir()) == ["report.json",
                                                                                                    "report.md"]


def test_conformance_report_on_a_full_disk(tmp_path, monkeypatch):
    fail_second_write(monkeypatch)
    target = tmp_path / "rep"
    refused(run_main("conformance", "--backend", "cpu_ref", "--level", "op", "--ops", "rms_norm", "--cases", "quick",
                     "--report", str(target)), "--report", "No space left")
    assert list(tmp_path.iterdir()) == []


# -- plugins -----------------------------------------------------------------------------------------------------

MANIFEST = "backend: {name}\ndescription: test plugin\noperators: {{}}\n"


def plugin(root, name, init):
    d = root / name
    d.mkdir(parents=True)
    (d / "manifest.yaml").write_text(MANIFEST.format(name=name))
    (d / "__init__.py").write_text(init)


def test_broken_plugins_are_one_line_in_the_list_and_when_selected(tmp_path, monkeypatch):
    plugin(tmp_path, "boomy", "raise RuntimeError('boom\\nerror: forged line')\n")
    plugin(tmp_path, "exity", "import sys\nsys.exit(3)\n")
    plugin(tmp_path, "probey", "from core.backend import Backend\n"
                               "def probe(mode):\n    return 1 / 0\n"
                               "BACKEND = Backend('probey', 'cpu', 'gloo', probe, {})\n")
    monkeypatch.setenv("DSV3_BACKENDS_PATH", str(tmp_path))
    r = run_main("core.run", "--list-backends")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.strip().splitlines()}
    assert "cpu_ref" in lines and "available" in lines["cpu_ref"]
    assert "broken" in lines["boomy"] and "boom\\nerror: forged line" in lines["boomy"]
    assert "broken" in lines["exity"] and "SystemExit" in lines["exity"]
    assert "broken" in lines["probey"] and "ZeroDivisionError" in lines["probey"]
    assert not any(line.startswith("error") for line in r.stdout.splitlines())
    for name, needle in (("boomy", "RuntimeError"), ("exity", "SystemExit"), ("probey", "ZeroDivisionError")):
        refused(run_main("core.run", "--backend", name), "broken", needle)


# -- conformance --compare ---------------------------------------------------------------------------------------

GOOD = {"environment": {"backend": "x", "device": "cpu", "commit": "abc"},
        "summary": {"verdict": "PASS", "passed": 1, "failed": 0},
        "checks": [{"name": "op/rms_norm", "verdict": "pass", "rel_err": 0.001}]}


@pytest.mark.parametrize("content,needle", [
    ({**GOOD, "checks": [{"name": "a", "verdict": "pass", "rel_err": "x"}]}, "rel_err"),
    ({**GOOD, "checks": [{"name": "a", "verdict": "maybe"}]}, "verdict"),
    ({**GOOD, "checks": [{"name": "a", "verdict": "pass"}, {"name": "a", "verdict": "fail"}]}, "twice"),
    ({**GOOD, "environment": {"backend": ["x"], "device": "cpu", "commit": "a"}}, "environment.backend"),
    ({**GOOD, "summary": {"verdict": "PASS", "passed": -1, "failed": 0}}, "summary.passed"),
    ("[" * 50_000 + "]" * 50_000, "levels deep"),
    ('{"checks": [], "checks": []}', "duplicate key"),
])
def test_compare_report_validated_before_anything_runs(tmp_path, content, needle):
    other = tmp_path / "other.json"
    other.write_text(content if isinstance(content, str) else json.dumps(content))
    r = run_main("conformance", "--backend", "cpu_ref", "--level", "op", "--compare", str(other))
    refused(r, "--compare", needle)
    assert "conformance:" not in r.stdout, "nothing ran"


def test_compare_report_that_is_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "other.json")
    refused(run_main("conformance", "--backend", "cpu_ref", "--compare", str(tmp_path / "other.json")),
            "--compare", "FIFO")


def test_compare_escapes_names_from_the_other_report():
    from conformance.report_diff import compare, validate

    other = {**GOOD, "checks": [{"name": "evil\n| x |", "verdict": "fail", "rel_err": None}]}
    validate(other, "other")
    lines = compare({**GOOD, "checks": [{"name": "evil\n| x |", "verdict": "pass", "rel_err": 0.001}]}, other)
    assert all("\n" not in line for line in lines)
    assert any("evil\\n\\| x \\|" in line for line in lines)
