"""Where a search's Optuna study lives: its database opened (and checked to be a study's alone),
and the trials a killed search left running queued again."""
from __future__ import annotations

import warnings

from dfkd_base.errors import DfkdError, first_line


def open_storage(url: str):
    """Optuna's database at ``url``, with heartbeats that re-queue a dead worker's trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and their retry callback are marked experimental; they are what resumes shared studies
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    _check_optuna_database(url)
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=60, grace_period=180,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as error:  # sqlalchemy's and the driver's errors have no common base
        raise DfkdError(f"--storage {url}: cannot open it ({first_line(error)})") from None


# the tables Optuna's RDB storage makes; a database holding any other is someone else's
OPTUNA_TABLES = {"alembic_version", "studies", "study_directions", "study_system_attributes", "study_user_attributes",
                 "trial_heartbeats", "trial_intermediate_values", "trial_params", "trial_system_attributes",
                 "trial_user_attributes", "trial_values", "trials", "version_info"}


def _check_optuna_database(url: str) -> None:
    """A database that already holds tables must hold Optuna's and nothing else: a search never adds
    its tables to another application's database, nor writes into a table of the same name."""
    import sqlalchemy

    try:
        tables = set(sqlalchemy.inspect(sqlalchemy.create_engine(url)).get_table_names())
    except Exception as error:  # sqlalchemy's and the driver's errors have no common base
        raise DfkdError(f"--storage {url}: cannot open it ({first_line(error)})") from None
    foreign = sorted(tables - OPTUNA_TABLES)
    if foreign or (tables and not {"studies", "trials", "version_info"} <= tables):
        shown = ", ".join(foreign or sorted(tables))
        raise DfkdError(f"--storage {url} holds tables that are not an Optuna study's ({shown}); give a database "
                        f"for the search's studies alone")


def retry_cut_short(study) -> None:
    """Fail the trials a killed search left 'running' and queue each again, to continue in its folder."""
    import optuna
    from optuna.trial import TrialState

    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        retry(study, study._storage.get_trial(trial._trial_id))
