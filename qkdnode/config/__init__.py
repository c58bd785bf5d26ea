"""Validated node configuration (TOML -> pydantic)."""

from qkdnode.config.loader import ConfigError, load_config, parse_config
from qkdnode.config.model import NodeConfig

__all__ = ["ConfigError", "NodeConfig", "load_config", "parse_config"]
