"""Alternative Ascend descriptors, discovered only when this directory is on $DSV3_BACKENDS_PATH
(DSV3_BACKENDS_PATH=backends/ascend/variants), so the default `ascend` backend stays the only in-tree one."""
