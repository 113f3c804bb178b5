"""The edge process's plumbing: listeners, the control listener, the CLI, the store opener,
file modes, the reactor's dispatch patch, the log throttle and the now-or-later helpers."""
