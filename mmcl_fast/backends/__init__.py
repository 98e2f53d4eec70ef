"""Backends of the streamed-LSE primitive: reference (dense torch, ground truth), torch (blocked plain torch, any
device), cpu (compiled C++), triton (GPU). `mmcl_fast._ops.resolve_backend` picks one for backend="auto"."""
