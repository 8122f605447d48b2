"""PostgreSQL server fixture (started by the tests on 127.0.0.1, free port)."""
