"""`--junit PATH`: the report as JUnit XML for CI systems: one <testsuite> per level, one <testcase> per check
(classname conformance.LEVEL.OPERATOR, name the check's name), a <failure> with the check's detail as its message
and the command that reproduces it alone as its text, a <skipped> with its reason."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from conformance.context import FAIL, SKIP
from core.safe_files import StagedFile, one_line


def _text(value: object) -> str:
    """One line of XML-safe text (control characters other than tab dropped)."""
    return "".join(ch for ch in one_line(value) if ch == "\t" or ord(ch) >= 0x20)


def xml(report: dict) -> bytes:
    env = report["environment"]
    root = ET.Element("testsuites", name=f"conformance {_text(env['backend'])}",
                      tests=str(len(report["checks"])), failures=str(report["summary"]["failed"]),
                      skipped=str(report["summary"]["skipped"]), time=f"{report['wall_seconds']:.3f}")
    levels: dict[str, list[dict]] = {}
    for c in report["checks"]:
        levels.setdefault(c["level"], []).append(c)
    for level, checks in levels.items():
        suite = ET.SubElement(root, "testsuite", name=f"conformance.{level}", tests=str(len(checks)),
                              failures=str(sum(c["verdict"] == FAIL for c in checks)),
                              skipped=str(sum(c["verdict"] == SKIP for c in checks)), errors="0",
                              time=f"{sum(c['seconds'] for c in checks):.3f}")
        props = ET.SubElement(suite, "properties")
        for key in ("backend", "mode", "case_set", "seed", "device", "commit"):
            ET.SubElement(props, "property", name=key, value=_text(env.get(key, "")))
        for c in checks:
            case = ET.SubElement(suite, "testcase", classname=f"conformance.{level}.{_text(c['op'])}",
                                 name=_text(c["name"]), time=f"{c['seconds']:.3f}")
            if c["verdict"] == FAIL:
                failure = ET.SubElement(case, "failure", message=_text(c.get("detail") or "failed"), type="conformance")
                failure.text = f"reproduce alone: {_text(c.get('reproduce', ''))}"
            elif c["verdict"] == SKIP:
                ET.SubElement(case, "skipped", message=_text(c.get("detail") or "skipped"))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write(report: dict, path: Path) -> None:
    """Write the XML to `path` atomically (a one-line UserError on failure, nothing half-written)."""
    staged = StagedFile(Path(path), "--junit")
    staged.write(xml(report))
    staged.commit()
