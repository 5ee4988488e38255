"""Native CPU kernels: C++ custom operators on MindSpore's own oneDNN, compiled on first use (build.py)."""
