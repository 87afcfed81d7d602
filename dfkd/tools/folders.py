"""The folder of a multi-run tool (a chain, a search): its state file, read back with the config
recorded in it, so that ``--resume FOLDER`` continues it as it was configured."""
from __future__ import annotations

import json
from pathlib import Path

from dfkd.core.validate import dataclass_from_dict
from dfkd_base.errors import ConfigError, first_line


def read_folder_state(folder: str | Path, name: str, config_class: type) -> tuple[dict, object]:
    """The state file ``name`` of a chain's or search's folder, and the config recorded in it."""
    path = Path(folder) / name
    if not path.is_file():
        raise ConfigError(f"{folder} is not the folder of a {name.split('.')[0]} (no {name})")
    try:
        state = json.loads(path.read_text())
        config = state["config"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is damaged ({type(error).__name__}: {first_line(error)[:120]}); it cannot be "
                          f"resumed") from None
    if not isinstance(state, dict) or not isinstance(config, dict):
        raise ConfigError(f"{path} is damaged (not a mapping with a config); it cannot be resumed")
    return state, dataclass_from_dict(config_class, config, default_origin=str(path))
