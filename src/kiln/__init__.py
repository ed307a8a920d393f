"""kiln: an inference optimizer for ONNX models, in Python on PyTorch and Triton."""

from kiln.builder import BuildConfig, Profile, build
from kiln.engine import Engine, EngineLoadError, load_engine
from kiln.errors import InputError, KilnError, ModelLoadError, OpError, ResourceLimitError, UnsupportedModelError
from kiln.executor import Executor
from kiln.onnx_io import load_model, load_model_proto

__version__ = "0.1.0"

__all__ = [
    "BuildConfig",
    "Engine",
    "EngineLoadError",
    "Executor",
    "Profile",
    "build",
    "load_engine",
    "InputError",
    "KilnError",
    "ModelLoadError",
    "OpError",
    "ResourceLimitError",
    "UnsupportedModelError",
    "__version__",
    "load_model",
    "load_model_proto",
]
