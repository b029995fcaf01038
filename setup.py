"""megatron-keye: Megatron-style distributed training for Keye-VL-1.5-style video MLLMs."""

from setuptools import find_packages, setup

# The CPU wheel of torch 2.13.0 lies on the build machines' disk; an unpinned torch would pull a
# multi-GB CUDA build. GPU clusters install their own torch first and then `pip install -e .[gpu]`.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "psutil",  # dist_checkpointing's async writer hangs the parent without it
    "numpy",
    "pyyaml",
    "safetensors",
    "tokenizers",
    "transformers>=4.51",  # Qwen3ForCausalLM: HF interop and parity tests
    "pillow",
    "av",  # PyAV: the always-available video decoder
    "webdataset",  # shard writing (preprocess) and reading (loader)
]

EXTRAS = {
    # NVIDIA apex is not on PyPI (the PyPI `apex` is an unrelated package): build it from
    # github.com/NVIDIA/apex if you want its fused kernels; nothing here requires it.
    "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    "video": ["decord"],
    "wandb": ["wandb"],
    # Tests only: OpenCV and the released keye-vl-utils are the oracles the SlowFast tests compare
    # against (never imported by the package).
    "dev": [
        "pytest",
        "pytest-timeout",
        "ruff",
        "opencv-python-headless",
        "keye-vl-utils==1.5.2",
        "einops",
    ],
}

setup(
    name="megatron-keye",
    version="0.1.0",
    description="Megatron-style distributed training for Keye-VL-1.5-style video multimodal LLMs",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_keye", "megatron_keye.*"]),
    package_data={"megatron_keye": ["recipes/*.yaml", "data/text/assets/**/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-keye=megatron_keye.cli:main"]},
)
