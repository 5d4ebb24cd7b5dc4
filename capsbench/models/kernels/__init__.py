"""Faster paths for the same maths: FFT convolutions, C++ (CPU) and Triton (CUDA) routing."""
