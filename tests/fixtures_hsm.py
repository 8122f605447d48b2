"""SoftHSM2 token fixture (token created by the tests).

``softhsm_token`` gives the session one freshly initialised SoftHSM2 token in a temporary
directory, through a private ``SOFTHSM2_CONF`` set in this process's environment for the
duration of the session (the previous value is restored afterwards). A missing
``softhsm2-util`` or module is a test failure, never a skip: the project's test command
installs the Debian package ``softhsm2`` before pytest runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["SoftHsmToken", "softhsm_token"]

_INSTALL_HINT = "install softhsm2: the test command does this (apt-get install softhsm2)"


@dataclass(frozen=True, kw_only=True)
class SoftHsmToken:
    """A SoftHSM2 token initialised for this test session."""

    module: Path
    label: str
    user_pin: str
    so_pin: str
    conf: Path

    def uri(self, object_label: str) -> str:
        """The ``pkcs11:`` signer URI of key ``object_label`` on this token (module path included)."""
        return f"pkcs11:token={self.label};object={object_label}?module-path={self.module}"


def _find_softhsm_module() -> Path:
    from broker_plugin.ca.pkcs11 import MODULE_CANDIDATES

    for candidate in MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    pytest.fail(f"SoftHSM2 module libsofthsm2.so not found in {', '.join(MODULE_CANDIDATES)}; {_INSTALL_HINT}", pytrace=False)


def _reinitialize_if_loaded(module: Path) -> None:
    # If something loaded the module before this fixture, it read another (or no) config;
    # C_Finalize + C_Initialize makes it read ours.
    import pkcs11

    for so_path, lib in list(pkcs11._loaded.items()):
        if Path(so_path).resolve() == module.resolve() and lib.initialized:
            lib.reinitialize()


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    """One initialised SoftHSM2 token (label ``certmq-test``) private to this test session."""
    util = shutil.which("softhsm2-util")
    if util is None:
        pytest.fail(f"softhsm2-util is not on PATH; {_INSTALL_HINT}", pytrace=False)
    module = _find_softhsm_module()

    root = tmp_path_factory.mktemp("softhsm")
    tokens = root / "tokens"
    tokens.mkdir(mode=0o700)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    token = SoftHsmToken(module=module, label="certmq-test", user_pin="4711-user", so_pin="0815-so-pin", conf=conf)

    previous = os.environ.get("SOFTHSM2_CONF")
    # SoftHSM reads the variable when the module is initialised, so it must be set before any load.
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        proc = subprocess.run(
            [util, "--init-token", "--free", "--label", token.label, "--so-pin", token.so_pin, "--pin", token.user_pin],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            pytest.fail(f"softhsm2-util --init-token failed ({proc.returncode}): {proc.stderr or proc.stdout}", pytrace=False)
        _reinitialize_if_loaded(module)
        yield token
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
