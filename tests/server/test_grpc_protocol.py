"""Our .proto files are wire-compatible with Triton's, and the checked-in stubs are current.

tritonclient ships Triton's own ``grpc_service.proto`` / ``model_config.proto`` descriptors;
every message and field we declare must exist there with the same number, type and
cardinality (we declare a subset), and every RPC must have the same path and types.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton_pb

from pruneserve.server import protogen
from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import model_config_pb2 as mc


def _field_signature(f: FieldDescriptor) -> tuple[object, ...]:
    kind = f.message_type.full_name if f.message_type else f.enum_type.full_name if f.enum_type else f.type
    return (f.name, f.number, kind, f.is_repeated)


def _compare_message(ours: Descriptor, theirs: Descriptor, problems: list[str]) -> None:
    for field in ours.fields:
        other = theirs.fields_by_number.get(field.number)
        if other is None:
            problems.append(f"{ours.full_name}.{field.name} (#{field.number}) is not in Triton's proto")
        elif _field_signature(field) != _field_signature(other):
            problems.append(f"{ours.full_name}: ours {_field_signature(field)} != Triton's {_field_signature(other)}")
    for oneof in ours.oneofs:
        if oneof.name not in theirs.oneofs_by_name:
            problems.append(f"{ours.full_name} oneof {oneof.name} is not in Triton's proto")
    for nested in ours.nested_types:
        if nested.GetOptions().map_entry:
            continue
        _compare_message(nested, theirs.nested_types_by_name[nested.name], problems)
    for enum in ours.enum_types:
        _compare_enum(enum, theirs.enum_types_by_name[enum.name], problems)


def _compare_enum(ours: EnumDescriptor, theirs: EnumDescriptor, problems: list[str]) -> None:
    for value in ours.values:
        if theirs.values_by_name.get(value.name) is None or theirs.values_by_name[value.name].number != value.number:
            problems.append(f"{ours.full_name}.{value.name} = {value.number} differs from Triton's")


def test_messages_and_enums_match_triton() -> None:
    problems: list[str] = []
    for ours_file, theirs_file in ((pb.DESCRIPTOR, triton_pb.DESCRIPTOR), (mc.DESCRIPTOR, triton_mc.DESCRIPTOR)):
        assert ours_file.package == theirs_file.package == "inference"
        for name, message in ours_file.message_types_by_name.items():
            assert name in theirs_file.message_types_by_name, f"{name} is not a Triton message"
            _compare_message(message, theirs_file.message_types_by_name[name], problems)
        for name, enum in ours_file.enum_types_by_name.items():
            _compare_enum(enum, theirs_file.enum_types_by_name[name], problems)
    assert problems == []


def test_rpcs_match_triton() -> None:
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    core = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"}
    extensions = {"ModelStreamInfer", "ModelConfig", "ModelStatistics"}
    repository = {"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}
    assert core | extensions | repository == {m.name for m in ours.methods}
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name,
            other.output_type.full_name,
        )
        assert (method.client_streaming, method.server_streaming) == (other.client_streaming, other.server_streaming)


@pytest.mark.parametrize(
    "message",
    ["RepositoryIndexRequest", "RepositoryIndexResponse.ModelIndex", "RepositoryModelLoadRequest",
     "RepositoryModelUnloadRequest", "ModelRepositoryParameter"],
)  # fmt: skip
def test_repository_messages_have_tritons_fields(message: str) -> None:
    def fields(module: Any) -> dict[str, tuple[int, int]]:
        descriptor = module.DESCRIPTOR.message_types_by_name[message.split(".")[0]]
        for nested in message.split(".")[1:]:
            descriptor = descriptor.nested_types_by_name[nested]
        return {f.name: (f.number, f.type) for f in descriptor.fields}

    assert fields(pb) == fields(triton_pb)


def test_a_load_request_round_trips_through_tritons_messages() -> None:
    request = pb.RepositoryModelLoadRequest(model_name="m")
    request.parameters["config"].string_param = "{}"
    theirs = triton_pb.RepositoryModelLoadRequest.FromString(request.SerializeToString())
    assert theirs.model_name == "m" and theirs.parameters["config"].string_param == "{}"


def test_a_request_round_trips_through_tritons_messages() -> None:
    request = pb.ModelInferRequest(model_name="m", model_version="2", id="r")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    tensor.parameters["p"].int64_param = 7
    request.raw_input_contents.append(b"\x05\x00\x00\x00hello")
    request.outputs.add(name="label")
    theirs = triton_pb.ModelInferRequest.FromString(request.SerializeToString())
    assert theirs.inputs[0].parameters["p"].int64_param == 7
    assert pb.ModelInferRequest.FromString(theirs.SerializeToString()) == request


def test_checked_in_stubs_are_current() -> None:
    assert protogen.check() == []
