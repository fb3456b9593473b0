"""Database access: table definitions, the engine, and the few queries labsync needs."""
