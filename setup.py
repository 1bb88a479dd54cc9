from setuptools import find_packages, setup

setup(
    name="ntkcompile",
    version="0.1.0",
    description="Compile PyTorch modules into their infinite-width NNGP and NTK kernels (Tensor Programs)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ntkcompile", "ntkcompile.*"]),
    # the C kernels, compiled on first use (kernels/fused.py, kernels/native.py)
    package_data={"ntkcompile.kernels": ["fused.c", "sampling.c", "simd.h"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.2", "numpy", "opt_einsum>=3.3"],
    entry_points={"console_scripts": ["ntkcompile = ntkcompile.cli:main"]},
    extras_require={
        "test": ["pytest", "scipy", "scikit-learn", "matplotlib"],   # the demo's data and plots are tested
        "demo": ["scikit-learn", "matplotlib"],
    },
)
