"""`certmq broker` as a process: first run makes (and loudly announces) a development CA, prints
where it listens, serves mutual TLS with the plugin, stops cleanly on SIGTERM; a bad config fails
with a clear message."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from broker_plugin.server import DEV_PASSPHRASE_FILE

from .conftest import wait_ready


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "broker_plugin.cli", "broker", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def test_first_run_dev_ca_listen_connect_and_clean_stop(tmp_path: Path) -> None:
    """No tenant: the dev tenant is created with a boxed warning naming the passphrase file; the broker
    listens on a free port (--port 0), refuses a client without a certificate, accepts the dev
    tenant's server certificate for 127.0.0.1, and exits 0 on SIGTERM, removing its ready file."""
    data = tmp_path / "data"
    proc = _start("--data", str(data), "--port", "0")
    ready = wait_ready(data / "broker" / "ready.json", proc)
    try:
        assert (data / DEV_PASSPHRASE_FILE).stat().st_mode & 0o077 == 0
        context = ssl.create_default_context(cafile=str(data / "tenants" / "dev" / "chain.pem"))
        with pytest.raises(aiomqtt.MqttError):  # the server requires a client certificate
            async with aiomqtt.Client("127.0.0.1", int(ready["port"]), identifier="x", tls_context=context, timeout=3):  # type: ignore[call-overload]
                pass
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "DEVELOPMENT CA" in err and "NOT FOR PRODUCTION" in err and str(data / DEV_PASSPHRASE_FILE) in err
    assert f"listening on 127.0.0.1:{ready['port']}" in out and "stopped" in out
    assert not (data / "broker" / "ready.json").exists()
    # a second run reuses the tenant and its passphrase file, without the first-run box
    proc = _start("--data", str(data), "--port", "0", "--echo")
    wait_ready(data / "broker" / "ready.json", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "DEVELOPMENT CA CREATED" not in err and "ECHO MODE" in out


def test_wrong_passphrase_fails_clearly(tmp_path: Path) -> None:
    """An existing tenant with a wrong passphrase: exit 1, one clear line, nothing listening."""
    data = tmp_path / "data"
    secret = tmp_path / "pass"
    secret.write_text("right one\n")
    os.chmod(secret, 0o600)
    proc = _start("--data", str(data), "--port", "0", "--passphrase-file", str(secret))
    wait_ready(data / "broker" / "ready.json", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    secret.write_text("wrong one\n")
    (data / "broker" / "server.pem").unlink()  # forces a CA operation before listening
    done = subprocess.run([sys.executable, "-m", "broker_plugin.cli", "broker", "--data", str(data), "--port", "0",
                           "--passphrase-file", str(secret)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "wrong passphrase" in done.stderr
    assert not (data / "broker" / "ready.json").exists()
