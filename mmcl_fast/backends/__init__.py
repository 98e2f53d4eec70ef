"""Backends of the streamed-LSE primitive: reference (dense torch), cpu (compiled C++), triton (GPU)."""
