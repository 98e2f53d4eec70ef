"""Research studies built on mmcl_fast's public API. They live beside the library, not in it: run them from a clone
of the repository (`python -m studies.misalign --help`, `python -m studies.cmcr --help`); the installed package
holds only the losses."""
