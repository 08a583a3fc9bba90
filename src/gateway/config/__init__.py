"""Configuration: the schema, the pure parser, the loader that reads files, and the ``init`` writer."""

from gateway.config.load import LoadedConfig, load_config, load_credentials
from gateway.config.model import (
    Config,
    Credentials,
    IbkrConfig,
    LoggingConfig,
    RouteConfig,
    ServerConfig,
    SessionConfig,
    SimulatorConfig,
    UpstreamConfig,
    WebSocketConfig,
)
from gateway.config.parse import parse_config

__all__ = [
    "Config",
    "Credentials",
    "IbkrConfig",
    "LoadedConfig",
    "LoggingConfig",
    "RouteConfig",
    "ServerConfig",
    "SessionConfig",
    "SimulatorConfig",
    "UpstreamConfig",
    "WebSocketConfig",
    "load_config",
    "load_credentials",
    "parse_config",
]
