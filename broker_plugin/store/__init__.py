"""Registry stores: one interface, SQLite (embedded default) and PostgreSQL."""
