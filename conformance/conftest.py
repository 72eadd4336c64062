"""`pytest conformance --backend NAME [--interpret] [--simulate] [--level ...] [--cases ...]`: the same checks as
`python -m conformance`, one pytest test per check."""

from __future__ import annotations


def pytest_addoption(parser):
    g = parser.getgroup("conformance")
    g.addoption("--backend", default="cpu_ref", help="backend to judge")
    g.addoption("--interpret", action="store_true", help="Triton interpreter on the CPU")
    g.addoption("--simulate", action="store_true", help="vendor library emulation")
    g.addoption("--level", default="op,block,model", help="comma-separated levels")
    g.addoption("--cases", default=None, help="case set: quick, full or gpu")
    g.addoption("--conformance-seed", type=int, default=None, help="seed of the random inputs")
