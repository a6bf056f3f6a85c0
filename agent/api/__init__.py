"""The HTTP surface: thin handlers over the protocol-neutral data plane."""
