"""gptqkit: GPTQ quantization of Hugging Face causal LMs, standard checkpoints, fast kernels."""
__version__ = "0.1.0"

from .api import load, quantize  # noqa: E402
from .config import QuantizeConfig  # noqa: E402
from .errors import GPTQKitError  # noqa: E402

__all__ = ["QuantizeConfig", "GPTQKitError", "quantize", "load", "__version__"]
