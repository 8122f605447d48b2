"""A blocking facade over :class:`~device_client.client.DeviceClient` for integrators without asyncio.

The client runs on its own event loop in a daemon thread; each method submits
a coroutine there and waits for the result::

    with BlockingDeviceClient(device_id=..., tenant=..., transport_factory=lambda: AiomqttTransport(...),
                              store=store) as dc:
        dc.enroll()
        dc.renew(Profile.IDENTITY)

The transport is built *by a factory* inside the loop thread, since asyncio
objects belong to the loop that made them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from protocol.codes import Profile

from .certstore import Slot
from .client import DeviceClient, ProfileStatus
from .transport import Transport

__all__ = ["BlockingDeviceClient"]

T = TypeVar("T")


class BlockingDeviceClient:
    """Same arguments as :class:`DeviceClient`, but ``transport_factory`` instead of ``transport``."""

    def __init__(self, *, transport_factory: Callable[[], Transport], timeout: float | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="certmq-device", daemon=True)
        self._thread.start()
        self.timeout = timeout

        async def build() -> DeviceClient:
            return DeviceClient(transport=transport_factory(), **kwargs)

        self.client: DeviceClient = self._call(build())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout)

    def __enter__(self) -> BlockingDeviceClient:
        self._call(self.client.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enroll(self, profile: Profile = Profile.IDENTITY) -> Slot:
        """See :meth:`DeviceClient.enroll`."""
        return self._call(self.client.enroll(profile))

    def renew(self, profile: Profile = Profile.IDENTITY, *, reuse_key: bool | None = None) -> Slot:
        """See :meth:`DeviceClient.renew`."""
        return self._call(self.client.renew(profile, reuse_key=reuse_key))

    def status(self) -> dict[Profile, ProfileStatus]:
        """See :meth:`DeviceClient.status`."""
        async def get() -> dict[Profile, ProfileStatus]:
            return self.client.status()

        return self._call(get())

    def close(self) -> None:
        """Disconnect and stop the loop thread."""
        if not self._loop.is_running():
            return
        try:
            self._call(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()
