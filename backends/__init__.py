"""In-tree backends: one directory per vendor, each with a descriptor (`BACKEND`) and a `manifest.yaml`."""
