"""Shared benchmark plumbing: activate a backend, time a callable, measure the device's practical roofs (copy
bandwidth, bf16 matmul rate), and write the results as a table, JSON and markdown named after the device.

Accelerator timing is device-neutral (torch.Event and torch.accelerator, no vendor API): events around each call,
the L2 flushed between calls by zeroing a 256 MB buffer, the median reported, as triton.testing.do_bench does for
vLLM and SGLang. On the CPU (the interpreter smoke mode) a plain perf_counter median is enough: the numbers are not
meaningful there, only the machinery is checked.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core import registry  # noqa: E402
from core.backend import Availability, Backend, RunMode  # noqa: E402


@dataclass
class Roofs:
    """What the device achieves on plain torch work in this run: the yardsticks for every kernel."""

    copy_gbps: float  # y.copy_(x), bytes read + written per second / 1e9
    matmul_tflops: float  # bf16 (float32 on the CPU) torch.matmul
    copy_bytes: int
    matmul_n: int


@dataclass
class Row:
    """One operator at one shape."""

    op: str
    shape: str
    ms: float
    ref_ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    frac_copy: float | None = None
    frac_matmul: float | None = None
    speedup: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def activate(name: str, interpret: bool) -> tuple[Backend, Availability, Backend]:
    """(backend, its availability, cpu_ref) — cpu_ref's operators run on the backend's device for the speed-up."""
    backend, avail = registry.activate(name, RunMode(interpret=interpret))
    return backend, avail, registry.load(registry.REFERENCE)


def on_gpu(device: torch.device) -> bool:
    """An accelerator (any vendor), as opposed to the CPU of the interpreter smoke mode."""
    return device.type != "cpu"


def sync(device: torch.device) -> None:
    if on_gpu(device):
        torch.accelerator.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if on_gpu(device):
        torch.accelerator.empty_cache()


def _device_seconds(fn: Callable[[], object], device: torch.device, rep_ms: int) -> float:
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    fn()
    sync(device)
    start, end = torch.Event(device=device, enable_timing=True), torch.Event(device=device, enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    sync(device)
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(rep_ms / 4 / estimate_ms))):  # warm-up
        fn()
    events = []
    for _ in range(max(5, int(rep_ms / estimate_ms))):
        flush.zero_()
        s, e = torch.Event(device=device, enable_timing=True), torch.Event(device=device, enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    sync(device)
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def bench(fn: Callable[[], object], device: torch.device, rep_ms: int = 100, cpu_reps: int = 1) -> float:
    """Seconds per call of `fn` (median)."""
    if on_gpu(device):
        return _device_seconds(fn, device, rep_ms)
    fn()  # warm-up (the interpreter rewrites each kernel on first use)
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_roofs(device: torch.device, tiny: bool) -> Roofs:
    """Copy bandwidth on >= 256 MB (8 MB in tiny mode) and the bf16 matmul rate, on `device`."""
    nbytes = (8 if tiny else 512) << 20
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), device, rep_ms=200, cpu_reps=3)
    n = 256 if tiny else 8192
    dtype = torch.bfloat16 if on_gpu(device) else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    tm = bench(lambda: a @ b, device, rep_ms=300, cpu_reps=3)
    return Roofs(copy_gbps=2 * nbytes / t / 1e9, matmul_tflops=2 * n**3 / tm / 1e12, copy_bytes=nbytes, matmul_n=n)


def finish_row(row: Row, nbytes: float | None, flops: float | None, roofs: Roofs) -> Row:
    """Fill the rates and fractions of `row` from the bytes and FLOPs its operator moves."""
    s = row.ms / 1e3
    if nbytes:
        row.gbps = nbytes / s / 1e9
        row.frac_copy = row.gbps / roofs.copy_gbps
    if flops:
        row.tflops = flops / s / 1e12
        row.frac_matmul = row.tflops / roofs.matmul_tflops
    if row.ref_ms:
        row.speedup = row.ref_ms / row.ms
    return row


def device_label(avail: Availability) -> str:
    return avail.environment.get("device_name", str(avail.device))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


COLUMNS = [("op", "op", "{}"), ("shape", "shape", "{}"), ("ms", "time ms", "{:.4f}"), ("gbps", "GB/s", "{:.1f}"),
           ("frac_copy", "x copy", "{:.2f}"), ("tflops", "TFLOP/s", "{:.2f}"), ("frac_matmul", "x matmul", "{:.2f}"),
           ("ref_ms", "cpu_ref ms", "{:.4f}"), ("speedup", "speed-up", "{:.1f}"), ("note", "note", "{}")]


def _cell(row: Row, key: str, fmt: str) -> str:
    value = getattr(row, key)
    return "-" if value is None or value == "" else fmt.format(value)


def format_table(rows: list[Row]) -> str:
    cells = [[title for _, title, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip() for c in cells)


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    head = [f"# {meta['title']}", "", f"device: {meta['device']}", ""]
    head += [f"- {k}: {v}" for k, v in meta.items() if k not in ("title", "device")]
    lines = ["| " + " | ".join(t for _, t, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(head + [""] + lines) + "\n"


def write_reports(rows: list[Row], meta: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write `<stem>-<device>.json` and `.md` into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{stem}-{slug(meta['device'])}"
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    md_path.write_text(markdown(rows, meta))
    return json_path, md_path
