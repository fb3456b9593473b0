"""LIS adapters: one module per LIS behind the interface in ``base``; ``registry`` finds them."""
