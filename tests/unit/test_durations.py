"""Reading protobuf Durations (common/durations.py): values, unset fields, the positive-or-default rule."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from common.durations import millis, millis_if_set, positive_seconds_or, seconds, seconds_if_set
from common.proto.loadtest.v1 import key_service_pb2, run_pb2

pytestmark = pytest.mark.timeout(10)


def test_seconds_and_millis_of_a_duration() -> None:
    d = duration_pb2.Duration(seconds=2, nanos=500_000_000)
    assert seconds(d) == 2.5
    assert millis(d) == 2500.0
    assert seconds(duration_pb2.Duration(nanos=1)) == 1e-9
    assert millis(duration_pb2.Duration(seconds=-1, nanos=-500_000_000)) == -1500.0


def test_an_unset_field_reads_as_zero_or_none() -> None:
    stage = run_pb2.Stage()
    assert seconds(stage.duration) == 0.0
    assert seconds_if_set(stage, "duration") is None
    stage.duration.FromSeconds(0)
    assert seconds_if_set(stage, "duration") == 0.0  # set to zero is not unset
    slo = run_pb2.Slo()
    slo.ttft.FromMilliseconds(250)
    assert (millis_if_set(slo, "ttft"), millis_if_set(slo, "tpot")) == (250.0, None)
    request = key_service_pb2.CreateKeyRequest()
    request.ttl.FromSeconds(86_400)
    assert seconds_if_set(request, "ttl") == 86_400.0


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        (duration_pb2.Duration(seconds=30), 30.0),
        (duration_pb2.Duration(nanos=1_000_000), 0.001),
        (duration_pb2.Duration(), 7.0),  # zero or unset
        (duration_pb2.Duration(seconds=-1), 7.0),
    ],
)
def test_positive_seconds_or_default(duration: duration_pb2.Duration, expected: float) -> None:
    assert positive_seconds_or(duration, 7.0) == expected
