"""crate-alpha: CRATE-α white-box vision transformers on timm and open_clip."""
from setuptools import find_packages, setup

# Versions pinned to what is known to work together (see DEVELOPERS.md facts):
# open_clip_train's webdataset loader breaks on webdataset 0.2.111, and
# clip-benchmark 1.6.2 breaks on numpy 2.4.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm==1.0.31",
    "open_clip_torch==3.3.0",
    "safetensors>=0.4",
    "numpy<2.4",
    "webdataset==0.2.86",
    "clip-benchmark==1.6.2",
    "img2dataset==1.47.0",
    "scikit-learn",
    "scipy",  # crate_alpha.interpret: the generalised eigensolver and connected components of MaskCut
    "pandas",
    "pyarrow",
    "pillow",
    "tqdm",
    "matplotlib",
    "pyyaml",
]

setup(
    name="crate-alpha",
    version="0.1.0",
    description="CRATE-α (Scaling White-Box Transformers for Vision) for timm and open_clip",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"crate_alpha": ["model_configs/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "tpu": ["torch_xla==2.14.*"],
        "dev": ["pytest", "ruff"],
    },
    entry_points={"console_scripts": ["crate-alpha=crate_alpha.cli:main"]},
)
