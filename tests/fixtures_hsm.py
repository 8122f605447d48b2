"""SoftHSM2 token fixture (token created by the tests)."""
