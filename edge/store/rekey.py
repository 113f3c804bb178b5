"""`python -m edge.store.rekey --config FILE`: encrypt the store's secrets under the first key.

The last step of rotating the store key (``edge.store.keyring``): once the new key is first
in the key file of every edge sharing the database and each edge was restarted, this
encrypts every stored secret again under it, after which the old key can be removed from
the files. It prints how many secrets it changed, never a key or a secret.
"""

from __future__ import annotations

import argparse
import sys

from edge.config import ConfigError, load_config
from edge.store.engine import make_engine
from edge.store.keyring import StoreKeyError, load_keys
from edge.store.sealed import check_keys, rekey


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.store.rekey", description=__doc__)
    parser.add_argument("--config", help="the edge's configuration file")
    parser.add_argument("--data-dir", help="the data directory (as given to the edge)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, data_dir=args.data_dir)
        keys = load_keys(config.store_key_path)
        engine = make_engine(config.store_url, keys=keys)
        try:
            check_keys(engine, keys)
            changed = rekey(engine, keys)
        finally:
            engine.dispose()
    except (ConfigError, StoreKeyError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    print(f"{changed} secret(s) encrypted again under the first key of {keys.source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
