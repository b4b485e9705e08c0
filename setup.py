from setuptools import find_packages, setup

setup(
    name="latent-diffusion",
    version="0.1.0",
    description="Stable Diffusion v1 sampling with DPM-Solver: a clean-room port of the CompVis ldm toolkit",
    license="MIT",
    packages=find_packages(include=["ldm", "ldm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "diffusers>=0.30",
        "transformers>=4.40",
        "open_clip_torch>=2.20",
        "ftfy>=6.1",
        "invisible-watermark>=0.2",
        "omegaconf>=2.3",
        "pytorch-lightning>=2.0",
        "einops>=0.6",
        "safetensors>=0.4",
        "pillow>=9.0",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={"test": ["pytest>=7", "scikit-image>=0.21"]},
)
