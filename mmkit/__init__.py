"""mmkit: M6, VLMo and mPLUG at laptop scale, in readable PyTorch."""
from mmkit.config import build_model, load_config, available_configs, register_model, register_preset  # noqa: F401

__version__ = "0.1.0"
