"""Validated node configuration (TOML -> pydantic)."""

from qkdnode.config.loader import ConfigError, load_config, parse_config
from qkdnode.config.model import NodeConfig
from qkdnode.config.site import LinkConfig, SiteConfig, load_site, parse_site

__all__ = [
    "ConfigError",
    "LinkConfig",
    "NodeConfig",
    "SiteConfig",
    "load_config",
    "load_site",
    "parse_config",
    "parse_site",
]
