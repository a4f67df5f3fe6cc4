"""Foundations without MPI topology: logging with rank and elapsed time, atomic outputs, hashing."""
