import textwrap

import pytest

from dfkd.core.config import load_config, load_config_dict, named_configs, parse_override
from dfkd.core.schema import Config
from dfkd_base.errors import ConfigError


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def base_and_child(tmp_path):
    write(tmp_path / "base.yaml", """
        experiment: base
        data: {name: digits, batch_size: 32}
        players:
          model: {kind: model, net: {name: lenet5}, optim: {lr: 0.1}}
        phases:
          - {player: model, batch: real, losses: {ce: 1.0}}
    """)
    return write(tmp_path / "child.yaml", """
        _base_: base.yaml
        experiment: child
        data: {batch_size: 64}
    """)


@pytest.mark.slow
def test_shipped_configs_load_and_validate():
    names = named_configs()
    assert "teacher/lenet5-fmnist" in names and "teacher/lenet5-digits" in names
    assert not any(n.startswith("_base_") for n in names)
    for name in names:
        if name.startswith("chain/"):  # chains of run configs, loaded with every stage checked
            from dfkd.tools.chain import ChainConfig, load_chain

            assert isinstance(load_chain(name), ChainConfig), name
        elif name.startswith("search/"):  # searches name a run config and a model family
            from dfkd.tools.search.config import SearchConfig, load_search

            assert isinstance(load_search(name), SearchConfig), name
        else:
            assert isinstance(load_config(name), Config), name


def test_base_inheritance_merges_deeply(base_and_child):
    cfg = load_config(str(base_and_child))
    assert cfg.experiment == "child"
    assert cfg.data.batch_size == 64 and cfg.data.name == "digits"  # sibling key kept from the base
    assert cfg.players["model"].optim.lr == 0.1
    assert cfg.players["model"].optim.momentum == 0.9  # schema default


def test_overrides_are_typed_and_win(base_and_child):
    cfg = load_config(str(base_and_child), ["players.model.optim.lr=0.05", "phases.0.steps=3",
                                            "data.root=/some/where", "seed=7", "train.iters_per_epoch=null"])
    assert cfg.players["model"].optim.lr == 0.05
    assert cfg.phases[0].steps == 3
    assert cfg.data.root == "/some/where"
    assert cfg.seed == 7 and cfg.train.iters_per_epoch is None


def test_scientific_notation_reads_as_float(base_and_child):
    # YAML 1.1 reads "5e-4" (no dot) as a string; the schema still wants a float
    cfg = load_config(str(base_and_child), ["players.model.optim.weight_decay=5e-4"])
    assert cfg.players["model"].optim.weight_decay == pytest.approx(5e-4)


def test_unknown_key_names_key_file_and_suggestion(base_and_child, tmp_path):
    write(tmp_path / "bad.yaml", """
        _base_: child.yaml
        players:
          model: {optim: {lrr: 0.1}}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "bad.yaml"))
    msg = str(err.value)
    assert "bad.yaml" in msg and "players.model.optim.lrr" in msg and "did you mean 'lr'" in msg
    assert "\n" not in msg


def test_error_names_the_base_file_that_set_the_key(tmp_path, base_and_child):
    write(tmp_path / "base.yaml", (tmp_path / "base.yaml").read_text() + "train: {epochs: many}\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: 'train\.epochs' must be int, got str 'many'"):
        load_config(str(base_and_child))


def test_ill_typed_override_names_command_line(base_and_child):
    with pytest.raises(ConfigError, match=r"command line: 'data.batch_size' must be int, got str 'big'"):
        load_config(str(base_and_child), ["data.batch_size=big"])
    with pytest.raises(ConfigError, match=r"'runtime.amp' must be one of auto, off, bf16, fp16"):
        load_config(str(base_and_child), ["runtime.amp=yes-please"])


def test_bare_off_reaches_a_choice_that_names_it(base_and_child, tmp_path):
    # YAML 1.1 reads a bare off as False, in an override as in a file
    assert load_config(str(base_and_child), ["runtime.amp=off"]).runtime.amp == "off"
    write(tmp_path / "amp.yaml", f"_base_: {base_and_child.name}\nruntime: {{amp: off}}\n")
    assert load_config(str(tmp_path / "amp.yaml")).runtime.amp == "off"
    with pytest.raises(ConfigError, match=r"'runtime.amp' must be one of auto, off, bf16, fp16; got True"):
        load_config(str(base_and_child), ["runtime.amp=on"])


def test_bool_is_not_an_int(base_and_child):
    with pytest.raises(ConfigError, match="must be int, got bool"):
        load_config(str(base_and_child), ["seed=true"])


def test_cross_field_checks(base_and_child):
    with pytest.raises(ConfigError, match="phases.0.player 'ghost' is not a player"):
        load_config(str(base_and_child), ["phases.0.player=ghost"])
    with pytest.raises(ConfigError, match="phases.0.steps must be >= 1"):
        load_config(str(base_and_child), ["phases.0.steps=0"])
    with pytest.raises(ConfigError, match=r"phases.0.epochs must be \[first, last\) with 0 <= first < last"):
        load_config(str(base_and_child), ["phases.0.epochs=[3, 2]"])
    with pytest.raises(ConfigError, match=r"data.labeled_fraction must be in \(0, 1\], got 0"):
        load_config(str(base_and_child), ["data.labeled_fraction=0"])
    with pytest.raises(ConfigError, match="phases.0.also: 'ghost' is not another player"):
        load_config(str(base_and_child), ["phases.0.also=[ghost]"])


def test_missing_config_suggests_shipped_names():
    with pytest.raises(ConfigError, match="config 'teacher/lenet5-fminst' not found.*teacher/lenet5-fmnist"):
        load_config("teacher/lenet5-fminst")


def test_base_cycle_and_bad_yaml(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(str(tmp_path / "a.yaml"))
    write(tmp_path / "broken.yaml", "data: {name: digits\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+ invalid YAML"):
        load_config(str(tmp_path / "broken.yaml"))
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping at the top level"):
        load_config(str(tmp_path / "list.yaml"))


def test_override_syntax_errors(base_and_child):
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="'phases' has 1 items, no index 4"):
        load_config(str(base_and_child), ["phases.4.steps=2"])
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


def test_origin_tracks_each_key(base_and_child):
    _, origin = load_config_dict(str(base_and_child), ["seed=3"])
    assert origin["experiment"].endswith("child.yaml")
    assert origin["data.name"].endswith("base.yaml")
    assert origin["data.batch_size"].endswith("child.yaml")
    assert origin["seed"] == "command line"


def test_epochs_that_no_phase_runs_in_are_refused():
    """Raising train.epochs past a staged config's last stage would train nothing in the added epochs."""
    with pytest.raises(ConfigError, match=r"train.epochs is 24, but no phase runs in epochs 8-23: set the phases' "
                                          r"epochs \(phases.N.epochs\) to cover them"):
        load_config("kd/fitnets-fmnist", ["train.epochs=24"])
    with pytest.raises(ConfigError, match=r"no phase runs in epochs 2-3, 6-7"):
        load_config("kd/fitnets-fmnist", ["phases.0.epochs=[0,2]", "phases.1.epochs=[4,6]"])
    stretched = load_config("kd/fitnets-fmnist", ["train.epochs=24", "phases.0.epochs=[0,6]", "phases.1.epochs=[6,24]"])
    assert [p.epochs for p in stretched.phases] == [[0, 6], [6, 24]]
    assert load_config("kd/kd-fmnist", ["train.epochs=24"]).train.epochs == 24  # a phase without bounds runs always
