"""The durable spool: segment files, the group commit, the sync process, reading a spool back."""
