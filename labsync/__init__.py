"""labsync: laboratory results from an LIS into a 1C-Bitrix site's personal account."""

__version__ = "0.1.0"
