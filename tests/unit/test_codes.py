"""common.codes against the generated protos: one member per proto value (the `_UNSPECIFIED`
zeros aside), with the proto's name and number, so a value added to the API cannot be missed."""

from __future__ import annotations

from enum import IntEnum

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from common.codes import FINAL_RUN_STATES, AssignmentState, RequestStatus, RunState
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("codes", "proto", "prefix"),
    [
        (RunState, run_pb2.RunState, "RUN_STATE_"),
        (AssignmentState, agent_service_pb2.AssignmentState, "ASSIGNMENT_STATE_"),
        (RequestStatus, run_pb2.RequestStatus, "REQUEST_STATUS_"),
    ],
)
def test_members_are_the_proto_values(codes: type[IntEnum], proto: EnumTypeWrapper, prefix: str) -> None:
    expected = {name.removeprefix(prefix): number for name, number in proto.items() if number}
    assert {member.name: member.value for member in codes} == expected


def test_lost_is_the_proto_value_stored_for_a_lost_assignment() -> None:
    assert AssignmentState.LOST == agent_service_pb2.ASSIGNMENT_STATE_LOST == 5


def test_final_run_states_are_those_a_run_ends_in() -> None:
    assert {RunState(s).name for s in FINAL_RUN_STATES} == {"SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED"}
