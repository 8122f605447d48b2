"""Shared pytest set-up. Service fixtures (PostgreSQL, SoftHSM2) live in their own plugin modules."""

pytest_plugins = ["fixtures_pg", "fixtures_hsm"]
