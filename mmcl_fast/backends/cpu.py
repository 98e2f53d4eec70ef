"""The compiled C++ CPU kernel (mmcl_fast._C) behind the primitive's `cpu` backend. Placeholder until built."""
