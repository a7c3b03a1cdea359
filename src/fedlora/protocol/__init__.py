"""The round protocol every runtime speaks: messages between server and clients, and the correction
history that lets a client catch up on the frozen weights.

Imports only :mod:`fedlora.types`, :mod:`fedlora.lowrank`, :mod:`fedlora.aggregators`, torch and
safetensors (``tests/protocol/test_imports.py`` checks it): no models, data, engines or CLI.
"""

from .container import message_sizes
from .history import CorrectionHistory
from .messages import (
    REPLY_FORMAT,
    TASK_FORMAT,
    ClientReply,
    ClientTask,
    MessageError,
    TrainSettings,
    decode_reply,
    decode_task,
    encode_reply,
    encode_task,
    reply_tensor_bytes,
    task_tensor_bytes,
)
from .schedule import LR_SCHEDULES, round_lr

__all__ = [
    "LR_SCHEDULES",
    "REPLY_FORMAT",
    "TASK_FORMAT",
    "ClientReply",
    "ClientTask",
    "CorrectionHistory",
    "MessageError",
    "TrainSettings",
    "decode_reply",
    "decode_task",
    "encode_reply",
    "encode_task",
    "message_sizes",
    "round_lr",
    "reply_tensor_bytes",
    "task_tensor_bytes",
]
