"""The real fedtl apps as a bundle for ``flwr run`` in the deployment fault tests."""
