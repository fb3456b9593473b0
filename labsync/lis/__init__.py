"""LIS adapters: one module per LIS behind the capability interfaces in ``base``;
``registry`` finds them."""
