"""The process's one DNS resolver, and host names resolved through it for the reactor."""
