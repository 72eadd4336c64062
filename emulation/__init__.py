"""Documented-semantics emulations of vendor libraries, for CI on machines without the hardware.

Each subpackage mirrors one vendor module's public operators (names, signatures, layouts, defaults and documented
rejections) in plain PyTorch on the CPU. Backends never import these directly: a backend's availability probe hands
one over in place of the real library only when the user asks for simulation and the library is absent.
"""
