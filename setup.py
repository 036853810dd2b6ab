"""Install the toolkit. torch is left to the user (CPU or CUDA build); without one, torch==2.13.0 is pulled."""
import importlib.util

from setuptools import find_packages, setup

install_requires = [
    "diffusers>=0.30",
    "transformers>=4.44",
    "accelerate>=0.33",
    "safetensors>=0.4",
    "toml>=0.10",
    "bitsandbytes>=0.43",
    "opencv-python-headless>=4.8",
    "einops>=0.7",
    "pillow-heif>=0.16",
    "tqdm>=4.60",
    "tensorboard>=2.14",
    "numpy>=1.24",
    "pillow>=10",
    "scipy>=1.10",
    "prodigyopt>=1.0",  # --optimizer_type Prodigy: sd-scripts installs it by default
    "schedulefree>=1.2",  # --optimizer_type AdamWScheduleFree / RAdamScheduleFree (sd-scripts installs it too)
]
# Respect an existing torch build (the user's CUDA or CPU choice); only a machine without torch gets the pinned one.
if importlib.util.find_spec("torch") is None:
    install_requires.insert(0, "torch==2.13.0")

setup(
    name="difftune",
    version="0.1.0",
    description="Script-per-task diffusion fine-tuning toolkit (SDXL LoRA, ControlNet-LLLite, FLUX LoRA)",
    # The shipped CLIP tokenizer files live in a folder without __init__.py; setuptools counts any such folder as an
    # importable (namespace) package and warns unless it is listed, so it is listed and its files are its data.
    packages=find_packages(include=["library", "library.*", "networks", "networks.*", "tools", "tools.*"])
    + ["library.models.tokenizers.clip"],
    package_data={"library.models.tokenizers.clip": ["*.json", "*.txt"]},
    # An explicit root makes `pip install -e .` a plain .pth to this folder (the layout scripts already assume),
    # instead of setuptools' import-hook finder and its "be careful with folders in your working directory" notice.
    package_dir={"": "."},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        "test": ["pytest>=7", "ruff>=0.6", "peft>=0.10", "sentencepiece>=0.1.99", "protobuf", "lycoris-lora>=4,<5"],
        "lycoris": ["lycoris-lora>=4,<5"],  # --network_module lycoris.kohya (LoKr, LoHa, LoCon, DoRA, (IA)^3, ...)
        "xformers": ["xformers"],
        "wandb": ["wandb"],
        "prodigy": ["prodigyopt"],
        "dadaptation": ["dadaptation"],  # --optimizer_type DAdaptAdam, DAdaptLion, ...
    },
)
