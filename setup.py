"""lagbias_mpi: MPI-parallel non-parametric Lagrangian halo bias (Wu, Munoz & Eisenstein 2023)."""
from setuptools import find_packages, setup

setup(
    name="lagbias_mpi",
    version="0.1.0",
    description="MPI-parallel neural-net Lagrangian halo bias for N-body simulations",
    packages=find_packages(exclude=["tests"]),
    package_data={"lagbias_mpi": ["data/*.json"]},
    python_requires=">=3.9",
    install_requires=[
        "numpy>=1.24", "scipy>=1.10", "mpi4py>=3.1", "mpi4py-fft>=2.0.5", "h5py>=3.8",
        "abacusutils>=2.0", "pyyaml>=6.0", "matplotlib>=3.7", "torch>=2.0",
    ],
    extras_require={"test": ["pytest>=7.0", "pytest-mpi>=0.6", "pytest-timeout>=2.1"]},
)
