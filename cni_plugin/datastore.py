"""The datastore as the CNI plugins reach it: settings from the netconf and the caller's
environment, the shared library's errors as CNI error codes in this one place, and the
readiness gate calico/node sets for ADD."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from cni_plugin.types import ERR_INTERNAL, ERR_INVALID_CONFIG, ERR_TRY_AGAIN_LATER, CNIError
from libcalico.datastore.base import (
    Datastore,
    DatastoreCorrupt,
    DatastoreError,
    DatastoreUnavailable,
    InvalidDatastoreConfig,
    NotFound,
)
from libcalico.datastore.config import DatastoreSettings
from libcalico.model import ClusterInformation, ResourceKey

NOT_READY = "Calico is currently not ready to process requests"


@contextmanager
def translate_errors() -> Iterator[None]:
    """Datastore failures as CNI errors: bad settings are the config's fault (7),
    unreachable is transient (11), corrupt is not."""
    try:
        yield
    except InvalidDatastoreConfig as err:
        raise CNIError(ERR_INVALID_CONFIG, str(err), err.hint) from err
    except DatastoreCorrupt as err:
        raise CNIError(
            ERR_INTERNAL,
            f"datastore is corrupt: {err}",
            "move the file aside (a new one is created empty) or restore a backup",
        ) from err
    except DatastoreUnavailable as err:
        raise CNIError(ERR_TRY_AGAIN_LATER, f"datastore unavailable: {err}") from err
    except DatastoreError as err:
        raise CNIError(ERR_TRY_AGAIN_LATER, f"datastore error: {err}") from err


def settings_for(conf: dict[str, Any], environ: Mapping[str, str] | None) -> DatastoreSettings:
    """The datastore a netconf names (its keys, else the caller's environment)."""
    with translate_errors():
        return DatastoreSettings.resolve(conf, environ or None)


def require_ready(store: Datastore) -> None:
    """ClusterInformation `datastoreReady: false` (an upgrade in progress) refuses ADD."""
    try:
        info: ClusterInformation = store.get(ResourceKey("ClusterInformation", "default")).value
    except NotFound:
        return  # no calico/node writes it here; absent means nobody marked it not ready
    if info.spec.get("datastoreReady") is False:
        raise CNIError(ERR_TRY_AGAIN_LATER, NOT_READY)
