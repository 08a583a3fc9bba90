"""ibkr-oauth-gateway: holds an IBKR Web API session through OAuth 1.0a and serves it as a plain local API."""

__version__ = "0.1.0"
