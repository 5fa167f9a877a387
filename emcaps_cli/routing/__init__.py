"""How EM routing executes: the fused routing loop and its C (CPU) and Triton kernels."""
