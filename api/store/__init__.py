"""State stores behind one interface (`api.store.base.Store`): SQLite and etcd."""

from __future__ import annotations

from api.settings import EtcdStoreSettings, SqliteStoreSettings
from api.store.base import Store


def open_store(config: SqliteStoreSettings | EtcdStoreSettings) -> Store:
    """Pick the implementation by name (`store.kind` in gslb.yaml)."""
    if isinstance(config, EtcdStoreSettings):
        from api.store.etcd import EtcdStore

        return EtcdStore(
            config.endpoints,
            prefix=config.prefix,
            request_timeout_s=config.request_timeout_s,
            deadline_s=config.deadline_s,
            watch_probe_s=config.watch_probe_s,
            heartbeat_writes=config.heartbeat_writes,
        )
    from api.store.sqlite import SqliteStore

    return SqliteStore(config.path)
