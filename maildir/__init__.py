"""Maildir++ storage for the device: folders, atomic delivery, flags and persistent UIDs.

This package does file-system work only; it must never open a network connection or
build a path from a name it has not validated.
"""

from .folder import Folder, MessageInfo
from .names import (
    FolderExists,
    FolderNotFound,
    InvalidName,
    MaildirError,
    MessageNotFound,
    address_folder,
    validate_folder_name,
    validate_message_id,
)
from .store import Maildir

__all__ = [
    "Maildir",
    "Folder",
    "MessageInfo",
    "MaildirError",
    "InvalidName",
    "FolderNotFound",
    "MessageNotFound",
    "FolderExists",
    "validate_message_id",
    "validate_folder_name",
    "address_folder",
]
