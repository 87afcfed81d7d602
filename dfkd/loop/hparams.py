"""TensorBoard's HParams dashboard for distillation runs.

Every run is a *session*: when it starts it logs its whole flattened config (booleans, numbers and
strings as themselves; lists as text), and five columns that say what the run is at a glance:
``Generator``, ``Losses``, ``Method``, ``Student`` and ``Teacher`` (capitalized, so that they sort
before the config's own keys, and TensorBoard shows the first five by default). When it ends it
logs its status. The metrics are the last values of the run's own curves: final and best accuracy,
the teacher's accuracy and the gap to it, agreement with the teacher, teacher-FID, precision,
recall and time.

Which columns exist, and which differ, is a property of all the runs TensorBoard is shown, not of
one: TensorBoard takes them from one *experiment* summary. A run writes that summary for the folder
its runs share (``output.root``) at its start and at its end, from every run config found there,
so that the columns are the union of the runs' keys and a key differs when its value differs
between runs or a run lacks it. A TensorBoard started before a run began reads the columns it saw
first; restart it to see the new run's.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from dfkd.core.config import flatten
from dfkd.core.io import open_append

# (tag, what the column says): the metrics of every session, in the order the dashboard shows them
METRICS = [("eval/acc", "final accuracy (%)"), ("eval/best_acc", "best accuracy (%)"),
           ("eval/teacher_acc", "teacher accuracy (%)"), ("eval/gap_to_teacher", "teacher minus student (points)"),
           ("eval/agreement", "agrees with the teacher, evaluation split (%)"),
           ("eval/teacher_agreement", "agrees with the teacher, held-out synthetic samples (%)"),
           ("quality/teacher_fid", "teacher-FID of synthetic samples"), ("quality/precision", "precision"),
           ("quality/recall", "recall"), ("time/total_s", "time (s)")]
EXPERIMENT_FOLDER = ".hparams"   # under output.root: the one experiment summary of the runs there
MAX_RUNS = 5000                  # run configs read for the experiment summary at most (the newest)


def evaluated_player(config: dict) -> str:
    """The player a run evaluates (``train.eval_player``; a student; else its first model)."""
    players = config.get("players") or {}
    return (config.get("train") or {}).get("eval_player") or ("student" if "student" in players else next(
        (name for name, p in players.items() if (p or {}).get("kind", "model") == "model"), ""))


def _net(spec: dict | None) -> str:
    if not spec:
        return "—"
    kwargs = ", ".join(f"{k}={v}" for k, v in (spec.get("kwargs") or {}).items())
    return f"{spec.get('name')}({kwargs})" if kwargs else str(spec.get("name"))


def _term(name: str, spec: Any) -> str:
    weight, params = (spec, {}) if not isinstance(spec, dict) else \
        (spec.get("weight", 1.0), {k: v for k, v in spec.items() if k != "weight"})
    shown = f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})" if params else name
    return shown if weight == 1 else f"{weight:g}×{shown}"


def _model_file(path: str) -> str:
    """A model file as a column shows it: the run that made it (``<experiment>/<stamp>``, with
    ``best`` for its best state), else its name."""
    p = Path(path)
    if p.parent.name == "ckpt" and len(p.parts) >= 4:
        return "/".join(p.parts[-4:-2]) + (" (best)" if p.stem == "best" else "")
    return p.name


def at_a_glance(config: dict) -> dict[str, str]:
    """The five columns that say what a run is (see the module docstring)."""
    student = evaluated_player(config)
    players = config.get("players") or {}
    synthesis = config.get("synthesis") or {}
    kind = synthesis.get("kind", "none")
    method = "teacher training" if config.get("task") == "teacher" else \
        f"data-free ({kind})" if kind != "none" else "distillation on real data"
    teacher = (config.get("teacher") or {}).get("checkpoint")
    teachers = teacher if isinstance(teacher, list) else [teacher] if teacher else []
    losses = [_term(name, spec) for phase in config.get("phases") or [] if phase.get("player") == student
              for name, spec in (phase.get("losses") or {}).items()]
    generator = players.get(synthesis.get("generator") or "") if kind == "generator" else None
    return {"Method": f"{method}: {config.get('experiment')}",
            "Student": _net((players.get(student) or {}).get("net")),
            "Teacher": " + ".join(_model_file(t) for t in teachers) or "—",
            "Losses": " + ".join(losses) or "—",
            "Generator": _net((generator or {}).get("net")) if generator else "—"}


def hparam_value(value: Any) -> bool | float | str | None:
    """A config value as an HParams value: booleans, numbers and strings as themselves, lists
    and mappings as JSON text, None left out."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return json.dumps(value, default=str)


def run_hparams(config: dict) -> dict[str, bool | float | str]:
    """A run's HParams values: its flattened config and the at-a-glance columns."""
    values = {key: hparam_value(v) for key, v in flatten(config).items()}
    values.update(at_a_glance(config))
    return {k: v for k, v in values.items() if v is not None}


def _summary(tag: str, plugin_data):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(value=[Summary.Value(tag=tag, tensor=metadata.NULL_TENSOR,
                                        metadata=metadata.create_summary_metadata(plugin_data))])


def _proto_value(value: bool | float | str):
    from google.protobuf import struct_pb2

    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, float):
        return struct_pb2.Value(number_value=value)
    return struct_pb2.Value(string_value=value)


def session_start(writer, hparams: dict[str, bool | float | str], group: str) -> None:
    """Mark the run ``writer`` writes as an HParams session with these values."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=time.time())
    for key, value in hparams.items():
        info.hparams[key].CopyFrom(_proto_value(value))
    writer._get_file_writer().add_summary(_summary(metadata.SESSION_START_INFO_TAG,
                                                   plugin_data_pb2.HParamsPluginData(session_start_info=info)))


def session_end(writer, ok: bool) -> None:
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE,
                                          end_time_secs=time.time())
    writer._get_file_writer().add_summary(_summary(metadata.SESSION_END_INFO_TAG,
                                                   plugin_data_pb2.HParamsPluginData(session_end_info=info)))


def _run_configs(root: Path) -> list[dict]:
    """The configs of the runs under ``root`` (their ``config.yaml``; the newest ``MAX_RUNS``)."""
    found = sorted((p for p in root.glob("**/config.yaml") if EXPERIMENT_FOLDER not in p.parts and not p.is_symlink()),
                   key=lambda p: p.stat().st_mtime)[-MAX_RUNS:]
    configs = []
    for path in found:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and "players" in data and "phases" in data:  # a run's resolved config
            configs.append(data)
    return configs


def experiment_infos(runs: list[dict[str, bool | float | str]]):
    """The HParams columns of these runs' values: every key any run has, typed by its values (a
    column of mixed types is text), with the discrete domain of text and booleans, marked as
    differing when two runs' values differ or a run lacks the key."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2

    infos = []
    for key in sorted({k for run in runs for k in run}):
        values = [run.get(key) for run in runs]
        present = [v for v in values if v is not None]
        kinds = {type(v) for v in present}
        kind = kinds.pop() if len(kinds) == 1 else str
        differs = len({json.dumps(v) for v in values}) > 1
        info = api_pb2.HParamInfo(name=key, differs=differs, type={
            bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64}.get(kind, api_pb2.DATA_TYPE_STRING))
        if kind is not float:
            domain = sorted({str(v) if kind is str else v for v in present}, key=str)
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(
                values=[_proto_value(v) for v in domain]))
        infos.append(info)
    return infos


def write_experiment(root: str | os.PathLike) -> Path | None:
    """The experiment summary of the runs under ``root``, replacing the previous one (under a lock:
    runs that start or end together each leave a whole one). Returns its folder."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard import SummaryWriter

    root = Path(root)
    runs = [run_hparams(config) for config in _run_configs(root)]
    if not runs:
        return None
    folder = root / EXPERIMENT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    experiment = api_pb2.Experiment(
        hparam_infos=experiment_infos(runs),
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=what) for tag, what in METRICS])
    with _locked(folder / ".lock"):
        old = [p for p in folder.iterdir() if p.name.startswith("events.out.tfevents.")]
        writer = SummaryWriter(str(folder))
        writer._get_file_writer().add_summary(_summary(metadata.EXPERIMENT_TAG,
                                                       plugin_data_pb2.HParamsPluginData(experiment=experiment)))
        writer.close()
        for path in old:
            path.unlink(missing_ok=True)
    return folder


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open_append(path) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
