"""paradecode: parallel decoding for language models, measured honestly."""

from .api import encode_prompt, generate, generate_batch
from .decoding.sink import DecodeResult
from .errors import UserError
from .methods import all_methods, get_method
from .models import load_model
from .sampling import GenerationConfig
from .stats import DecodeStats

__version__ = "0.1.0"
__all__ = ["load_model", "generate", "generate_batch", "encode_prompt", "DecodeResult", "DecodeStats",
           "GenerationConfig", "UserError", "all_methods", "get_method", "__version__"]
