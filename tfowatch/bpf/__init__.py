"""The BPF C sources (package data: tfowatch.bpf.c, tfowatch.h) and their loader, beside the
field-offset table that feeds them from the running kernel's BTF (loader.OFFSETS)."""
