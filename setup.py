"""llava_jax: LLaVA (CLIP vision tower -> projector -> LLaMA decoder) in JAX / Flax NNX."""

from setuptools import find_packages, setup

# torch is pinned: `pip install torch==2.13.0` takes the CPU build; an unpinned torch pulls
# a multi-GB CUDA build.
TORCH = "torch==2.13.0"
# `python -m llava_jax.serve` (fastapi, uvicorn) and what drives it in `bench serve` and the
# tests: httpx, the official openai client, selenium for the page in the system's Chromium.
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "openai>=1.30", "selenium>=4.20"]

setup(
    name="llava_jax",
    version="0.1.0",
    description="LLaVA vision-language models in JAX/Flax: training, conversion, inference.",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    # The web chat page; the editable datagen prompts (prompts/<kind>/*.txt).
    package_data={"llava_jax.serve": ["static/*"], "llava_jax.datagen": ["prompts/*/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pillow>=10.0",
        "tqdm>=4.66",
        "httpx>=0.27",  # the OpenAI-compatible client of datagen and the LLaVA-Bench judge
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "qwix>=0.1.8",  # int8 / nf4 storage of a QLoRA run's frozen base (models/lora.py)
    ],
    extras_require={
        "torch": [TORCH],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "chex>=0.1.90",
            TORCH,
            "scikit-image>=0.22",
            "easy-vqa>=1.0",  # a public shapes VQA set (22 MB): configs/demo.py:easy_vqa
            "peft==0.21.2",  # LoRA adapters in PyTorch: the export / import parity tests
            *SERVE,
        ],
        "serve": SERVE,
        "tfds": ["tensorflow-datasets>=4.9.7", "array-record>=0.7"],
        # The TPU runtime and compiler (libtpu, matched to jax by jax's own extra): what a TPU
        # VM installs, and on any machine what `memory_plan --topology=v5p-8` compiles with.
        "tpu": ["jax[tpu]>=0.7"],
    },
)
