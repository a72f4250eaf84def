"""droidspeak package; builds the optional C++ CPU kernels in csrc/.

Install with `pip install --no-build-isolation -e .[test]` after torch==2.13.0, so the
extension builds against the installed torch (an isolated build would fetch another).
Set DROIDSPEAK_NO_EXT=1 to skip the extension; the engine then uses the torch
reference ops.
"""
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if not os.environ.get("DROIDSPEAK_NO_EXT"):
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "droidspeak._C",
        sources=["csrc/ops.cpp", "csrc/decode_attention.cpp", "csrc/extend_attention.cpp", "csrc/rope_store.cpp",
                 "csrc/rans.cpp", "csrc/codec_transform.cpp", "csrc/grouped_linear.cpp",
                 "csrc/norm_act.cpp", "csrc/layer_stack.cpp"],
        depends=["csrc/ops.h", "csrc/vec.h", "csrc/amx.h"],
        extra_compile_args=["-O3", "-march=native", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    ext.optional = True  # a failed build leaves the pure-torch path
    ext_modules.append(ext)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    name="droidspeak",
    version="0.1.0",
    description="SGLang-style LLM serving engine for families of fine-tuned models",
    package_dir={"": "python"},
    packages=find_packages("python"),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "transformers>=4.46",
        "gguf>=0.10",
        "accelerate",
        "safetensors",
        "tokenizers",
        "numpy",
        "tqdm",
        "matplotlib",
        "constriction",
        "redis>=5",
        "pyyaml",
        "tomli; python_version < '3.11'",
        "psutil",
        "fastapi",
        "uvicorn",
        "pydantic>=2",
        "prometheus-client",
    ],
    extras_require={"test": ["pytest", "ninja", "httpx", "openai", "hypothesis", "sglang-router", "peft"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["droidspeak=droidspeak.cli:main"]},
)
