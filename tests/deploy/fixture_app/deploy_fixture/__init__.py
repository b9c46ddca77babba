"""Deployment fixture app: proves that a run reaches every hospital over TLS and comes back."""
