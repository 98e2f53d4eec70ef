"""User-facing losses, one module per family. Each is a thin layer over the primitive in `mmcl_fast._ops`."""
