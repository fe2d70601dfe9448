"""The HParams experiment summary of the shipped design spaces, read back with TensorBoard's own
HParams protos (the end-to-end search tests read the sessions and the server's table)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from mtl.search.board import experiment_summary
from mtl.search.space import load_space

SPACES = sorted((Path(__file__).parent.parent / "search_spaces").rglob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_parameter_is_a_column_under_its_design_space_name(path: Path) -> None:
    space = load_space(path)
    (value,) = experiment_summary(space).value
    assert value.tag == metadata.EXPERIMENT_TAG
    assert value.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    infos = {h.name: h for h in data.experiment.hparam_infos}
    assert list(infos) == [*space.parameters, "fate", "reason"]
    for name, param in space.parameters.items():
        info = infos[name]
        if param.type in ("int", "float"):
            assert (info.domain_interval.min_value, info.domain_interval.max_value) == (
                param.low,
                param.high,
            )
        elif param.type == "bool":
            assert info.type == api_pb2.DATA_TYPE_BOOL
        else:
            values = [v for v in param.choices if v is not None]
            shown = [getattr(v, v.WhichOneof("kind")) for v in info.domain_discrete.values]
            # One type per column (TensorBoard's rule); mixed choices get no domain.
            kinds = {str if isinstance(v, str) else type(v) is bool for v in values}
            expected = [float(v) if not isinstance(v, str | bool) else v for v in values]
            assert sorted(shown) == (sorted(expected) if len(kinds) == 1 else [])
    assert infos["reason"].type == api_pb2.DATA_TYPE_STRING
    metric = space.objective.metric
    assert data.experiment.metric_infos[0].name.tag == f"search/best_{metric}"
