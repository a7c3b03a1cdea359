"""Flower runtime pieces: the round protocol's messages as Flower record content.

The only fedlora package that imports ``flwr`` (install the ``flower`` extra).
"""

from .records import (
    HEADER_RECORD,
    TENSOR_RECORD,
    content_tensor_bytes,
    content_to_reply,
    content_to_task,
    reply_to_content,
    task_to_content,
)

__all__ = [
    "HEADER_RECORD",
    "TENSOR_RECORD",
    "content_tensor_bytes",
    "content_to_reply",
    "content_to_task",
    "reply_to_content",
    "task_to_content",
]
