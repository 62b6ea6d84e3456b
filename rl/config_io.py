"""Typed configs from YAML with dotted overrides: the implementation is core/config_io.py.

Re-exported here because rl/ modules and user code import it under this name; it moved to core/ so
that reward.train (which must not import rl/) reads its config the same way.
"""
from core.config_io import ConfigError, apply_overrides, from_dict, load_yaml, save_yaml, to_dict

__all__ = ["ConfigError", "apply_overrides", "from_dict", "load_yaml", "save_yaml", "to_dict"]
