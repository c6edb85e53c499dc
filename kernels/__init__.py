"""CUDA sources of cp3d, shipped as package data (read by ``cp3d._cuda``)."""
