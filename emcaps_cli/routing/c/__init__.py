"""C kernels of the routing loop on the CPU: kernels.c, compiled on first use by ffi.py."""
