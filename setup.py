"""ocbank: online cluster memory bank on FAISS for industrial visual anomaly detection."""

from pathlib import Path

from setuptools import find_packages, setup

# The docs site (mkdocs.yml): `mkdocs build --strict` runs in CI, so `dev` carries these too.
DOCS = ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26", "mkdocstrings-python>=1.10"]

version: dict[str, str] = {}
exec(Path("ocbank/_version.py").read_text(), version)  # noqa: S102  (a literal assignment)

setup(
    name="ocbank",
    version=version["__version__"],
    description="Online cluster memory bank on FAISS for visual anomaly detection",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",  # SPDX expression; the text is LICENSE
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=find_packages(include=["ocbank", "ocbank.*"]),
    # ocbank/configs/ and the report template, read with importlib.resources / jinja2.PackageLoader
    package_data={"ocbank": ["configs/*.yaml", "jobs/templates/*.j2"]},
    include_package_data=False,
    install_requires=[
        "numpy>=1.24",
        "numba>=0.59",
        "torch>=2.1",
        "torchvision>=0.16",
        "h5py>=3.8",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "pillow>=9.0",
        "matplotlib>=3.7",
        "jinja2>=3.0",
        "psutil>=5.9",
        "threadpoolctl>=3.1",
    ],
    extras_require={
        # Mutually exclusive: both wheels install the same `faiss` module.
        "cpu": ["faiss-cpu>=1.8"],
        "gpu": ["faiss-gpu>=1.15.1"],
        "ray": ["ray>=2.9"],
        # `ocbank serve`; includes ray. 2.40+: max_queued_requests (load shedding), batches split by
        # multiplexed model; tested with 2.60. python-multipart: FastAPI's form parser, for form uploads
        # (0.0.13+ is importable as python_multipart).
        "serve": ["ray[serve]>=2.40", "python-multipart>=0.0.13"],
        # ocbank.integrations.anomalib; openvino runs anomalib's OpenVINOInferencer (its only ONNX-reading one)
        "anomalib": ["anomalib>=2.7", "openvino>=2024.0"],
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        "openvino": ["openvino>=2024.0"],
        "tiff": ["tifffile>=2023.1"],  # 16-bit float TIFFs, which PIL cannot open
        "docs": DOCS,
        "dev": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "hypothesis>=6.100",
            "tifffile>=2023.1",
            "ruff>=0.6",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "onnxscript>=0.1",
            # A real Open Inference Protocol client for the v2 routes' tests (tests only).
            "tritonclient[http]>=2.40",
            *DOCS,
        ],
    },
    entry_points={"console_scripts": ["ocbank=ocbank.cli:main"]},
)
