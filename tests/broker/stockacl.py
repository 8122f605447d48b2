"""An amqtt topic plugin for the STOCK broker: nobody may receive ``secret/#`` (a minimal ACL).

Loaded by dotted path (``stockacl.DenySecretReceive``), the way operators add ACLs to amqtt.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

__all__ = ["DenySecretReceive"]


class DenySecretReceive(BaseTopicPlugin):
    """Deny ``receive`` on ``secret/...``; allow everything else."""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        return not (action == Action.RECEIVE and topic is not None and topic.startswith("secret/"))

    @dataclass
    class Config:
        """No options."""
