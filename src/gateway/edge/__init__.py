"""The edge: what a client request is, parsed once into an immutable view, and where it may carry an API key (pure)."""
