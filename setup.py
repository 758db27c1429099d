"""cpo_jax: DPO, RLHF and Constrained Preference Optimization (CPO) in JAX."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8.6",
    "chex>=0.1.92",
    "ml-collections>=1.1.0",
    "matplotlib>=3.11",
    "tqdm>=4.66",
    "pyarrow>=14",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "absl-py>=2.1",
]

TEST = [
    "pytest>=8",
    "pytest-xdist>=3.8",
    "hypothesis>=6.100",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    # HF parity tests only; the library never imports them. torch is pinned to
    # the CPU build (an unpinned torch pulls a multi-GB CUDA build).
    "torch==2.13.0",
    "transformers>=5.0",
]

setuptools.setup(
    name="cpo_jax",
    version="0.1.0",
    description=(
        "DPO, RLHF and Constrained Preference Optimization (arXiv 2605.20834) "
        "in JAX: losses, diagnostics, Pallas log-prob kernel, sharded training."
    ),
    long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["cpo_jax", "cpo_jax.*"]),
    install_requires=CORE,
    extras_require={"test": TEST, "notebooks": ["nbclient>=0.10", "ipykernel>=6.29"]},
    entry_points={"console_scripts": ["cpo-jax=cpo_jax.cli:entry_point"]},
)
