"""crate-alpha: CRATE-α white-box vision transformers on timm and open_clip."""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# The start-up hook (src/_crate_alpha_autoload.py): site-packages runs this .pth line at
# interpreter start-up, so timm and open_clip know the CRATE-α models without an import.
AUTOLOAD_PTH = "crate_alpha_autoload.pth"
AUTOLOAD_LINE = "import _crate_alpha_autoload\n"


class build_py_with_autoload(build_py):
    """build_py that also puts the start-up .pth at the top of what is installed.

    A wheel installs its top level into site-packages, where .pth files are read. An
    editable install (setuptools' editable_wheel) builds into a scratch build_lib and
    installs only what lies in its unpacked wheel, which is the install command's
    install_lib there, so the .pth goes there instead.
    """

    def run(self):
        super().run()
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, AUTOLOAD_PTH), "w") as f:
            f.write(AUTOLOAD_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else outputs + [os.path.join(self.build_lib, AUTOLOAD_PTH)]


# Ranges that both tested environments satisfy: the main one (torch 2.14.1) and the XLA one
# (torch 2.9.0, the newest torch_xla's torch). The exact versions of each live in
# constraints/{main,xla}.txt, which `make` installs with. Known breakages set the upper
# bounds: open_clip_train's webdataset loader breaks on webdataset 0.2.110/0.2.111 (the
# newest two; 0.2.86 is the newest known to work, so it stays pinned), and clip-benchmark
# 1.6.2 on numpy 2.4.
INSTALL_REQUIRES = [
    "torch>=2.9,<2.15",
    "torchvision>=0.24,<0.30",
    "timm>=1.0.20,<1.1",
    "open_clip_torch>=3.3,<4",
    "safetensors>=0.4",
    "numpy<2.4",
    "webdataset==0.2.86",  # 0.2.110 and 0.2.111 (the same code) break open_clip_train's loader
    "clip-benchmark>=1.6.2,<1.7",
    "img2dataset>=1.47,<2",
    "scikit-learn",
    "scipy",  # crate_alpha.whitebox.interpret: the generalised eigensolver and connected components of MaskCut
    "pandas",
    "pyarrow",
    "pillow",
    "opencv-python-headless",  # crate_alpha.data.decode: crop resize, non-JPEG decode (img2dataset needs it too)
    "simplejpeg>=1.8",  # crate_alpha.data.decode: reduced-size JPEG decode straight to RGB (libjpeg-turbo)
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
    # the recipes in configs/ ship with the package (crate_alpha.configs), so every command,
    # the demos included, runs from an installed package as well as from a checkout
    package_dir={"": "src", "crate_alpha.configs": "configs"},
    packages=find_packages("src") + ["crate_alpha.configs"],
    py_modules=["_crate_alpha_autoload"],
    cmdclass={"build_py": build_py_with_autoload},
    package_data={"crate_alpha": ["model_configs/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # torch_xla 2.9.0 (the newest release) runs only on torch 2.9.0 and its torchvision;
        # its own "tpu" extra brings libtpu. On XLA:CPU (tests) libtpu is present but unused.
        "tpu": ["torch==2.9.0", "torchvision==0.24.0", "torch_xla[tpu]==2.9.0"],
        "dev": ["pytest", "ruff"],
        # `data download --distributor pyspark` (needs Java 17+); make venv installs it for the tests
        "spark": ["pyspark>=3.5,<5"],
        # fsspec back-ends for shard folders on object storage (hdfs:// uses pyarrow + libhdfs)
        "s3": ["s3fs"],
        "gcs": ["gcsfs"],
    },
    entry_points={"console_scripts": ["crate-alpha=crate_alpha.cli:main"]},
)
