"""Opening the configured store with its key: for the edge, its acceptors and its CLI.

`open_configured_store` loads the store key (`[edge] store_key_file`, default
`<data_dir>/edge/store.key`; made with mode 0600 on first start when `create_key` is set),
makes the data directory and `<data_dir>/edge` mode 0700 and the key file 0600 (narrowing
what an older version left open), migrates the database in a child process and checks that
the key opens every secret already stored. A missing, malformed or wrong key is a
ConfigError that says what to do, raised before anything is served; a key made on this
start that turns out not to fit is removed again. This module must never log a key.
"""

from __future__ import annotations

from edge.config import Config, ConfigError
from edge.runtime.private import private_dir, private_file
from edge.store import Store, open_store
from edge.store.keyring import StoreKeyError, StoreKeys, load_keys, load_or_create_keys
from edge.store.migrate import migrate_in_child
from edge.store.sealed import check_keys

__all__ = ["open_configured_store", "store_keys"]


def store_keys(config: Config, *, create: bool) -> tuple[StoreKeys, bool]:
    """The configured key ring (made when missing and `create`), and whether it was made."""
    path = config.store_key_path
    private_dir(config.data_path)
    private_dir(config.data_path / "edge")
    private_dir(path.parent, narrow=False)
    try:
        if create:
            keys, created = load_or_create_keys(path)
        else:
            keys, created = load_keys(path), False
    except StoreKeyError as exc:
        raise ConfigError(f"{exc} ([edge] store_key_file)") from None
    private_file(path)
    return keys, created


def open_configured_store(
    config: Config, *, migrate: bool = True, create_key: bool = True
) -> Store:
    """The store of `config`, migrated (in a child process) when `migrate`, with its key."""
    keys, created = store_keys(config, create=create_key)
    path = config.store_key_path
    try:
        if migrate:
            migrate_in_child(config.store_url, path)
        store = open_store(config.store_url, migrate=False, keys=keys)
    except BaseException:
        if created:  # nothing was encrypted with it: the migration's transaction failed
            path.unlink(missing_ok=True)
        raise
    try:
        check_keys(store.engine, keys)
    except StoreKeyError as exc:
        store.close()
        if created:
            path.unlink(missing_ok=True)
            raise ConfigError(
                f"the store key file {path} is missing, and the store holds secrets encrypted "
                "with a key: copy the key file from another edge sharing the database, or "
                "restore it from where the keys are kept"
            ) from None
        raise ConfigError(str(exc)) from None
    except BaseException:
        store.close()
        raise
    return store
