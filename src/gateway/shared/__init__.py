"""Shared WebSocket mode: every client connection of the gateway multiplexed on one IBKR WebSocket per session."""
