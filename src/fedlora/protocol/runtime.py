"""What a runtime is: it delivers a batch of client tasks and returns their replies, like Flower's ``Grid``.

The strategy drives the runtime (configure, exchange, aggregate), so a strategy that needs several
exchanges per global round needs no change to any runtime. Implementations: the in-process runtime on one
shared base model (:mod:`fedlora.sim.runtimes`), a stand-in remote runtime that serialises every message,
and later Flower's simulation and deployment runtimes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from .messages import ClientReply, ClientTask


@dataclass
class Exchange:
    """Replies by client id; ``failed`` names the clients that failed or timed out, with the reason.

    ``header_bytes`` holds, for runtimes that serialise, each client's bytes of message headers and JSON
    (task plus reply) beyond the tensor payloads the strategy counts; ``wire_tensor_bytes`` the tensor
    payload bytes of the messages themselves (task plus reply, as sent), which should equal the strategy's
    count.
    """

    replies: dict[str, ClientReply]
    failed: dict[str, str] = field(default_factory=dict)
    header_bytes: dict[str, int] = field(default_factory=dict)
    wire_tensor_bytes: dict[str, int] = field(default_factory=dict)


class Runtime(ABC):
    """Delivers tasks to clients and collects their replies."""

    @abstractmethod
    def exchange(self, tasks: dict[str, ClientTask],
                 on_reply: Callable[[str], None] | None = None) -> Exchange:
        """Run every task; call ``on_reply(client_id)`` as each client finishes."""

    def client_versions(self, client_ids: list[str]) -> dict[str, int]:
        """The frozen-weight version some of ``client_ids`` hold, where the runtime knows better than the
        strategy's record of what it sent (a remote node restarted, or never got its last task).

        Called before a round's tasks are built; the strategy then sends those clients the corrections since
        the reported version. Runtimes whose clients share the server's weights report nothing.
        """
        return {}
