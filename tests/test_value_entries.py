"""Critic and Q-network entries of a native file: exact round trip, one-line refusals."""

from __future__ import annotations

import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.policy.value import QNet, ValueNet


def _nets() -> list[tuple[torch.nn.Module, dict, tuple]]:
    torch.manual_seed(0)
    v = ValueNet(4, [8, 8], "tanh")
    q = QNet(4, 2, [8], "relu", action_low=[-1.0, -1.0], action_high=[1.0, 1.0])
    return [(v, v.to_entry(), (4,)), (q, q.to_entry(), (4, 2))]


@pytest.mark.parametrize("i", [0, 1])
def test_entries_round_trip_and_refuse_bad_weights(i: int) -> None:
    net, entry, dims = _nets()[i]
    cls = type(net)
    again = cls.from_entry(entry, *dims)
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    bad = dict(entry, state_dict={k: v.clone() for k, v in entry["state_dict"].items()})
    first = next(iter(bad["state_dict"]))
    bad["state_dict"][first][0] = float("nan")
    with pytest.raises(CompressorError, match="contains NaN or inf"):
        cls.from_entry(bad, *dims, origin="f.pt")
    short = dict(entry, state_dict=dict(list(entry["state_dict"].items())[1:]))
    with pytest.raises(CompressorError, match=r"^f\.pt: .*weights do not match"):
        cls.from_entry(short, *dims, origin="f.pt")
