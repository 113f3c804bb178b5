"""The edge process's plumbing: listeners, the CLI, the store opener, the admin keys, file
modes, the reactor's dispatch patch, the log throttle and the now-or-later helpers."""
