"""The API stays wire-compatible with the protos as last released (protos/released.binpb,
built with `buf build` from the protos at d68019d): no released message, field, enum value
or RPC is removed, renumbered or retyped. `make lint` runs `buf breaking` for the same; this
check needs no npm, so `make test` runs it too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from google.protobuf import descriptor_pb2

from lightllm_grpc.proto import generation_pb2, shard_pb2

RELEASED = Path(__file__).resolve().parent.parent / "protos" / "released.binpb"


def _released() -> Files:
    files = descriptor_pb2.FileDescriptorSet.FromString(RELEASED.read_bytes()).file
    return {f.name: f for f in files if f.package.startswith("lightllm.")}


def _current() -> Files:
    out = {}
    for module in (generation_pb2, shard_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        # The stubs are generated under a virtual root (lightllm_grpc/_proto/...); buf names
        # files from protos/.
        out[proto.name.split("_proto/")[-1]] = proto
    return out


def _messages(prefix: str, messages) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for m in messages:
        yield f"{prefix}.{m.name}", m
        yield from _messages(f"{prefix}.{m.name}", m.nested_type)


Files = dict[str, descriptor_pb2.FileDescriptorProto]


def incompatibilities(released: Files, current: Files) -> list[str]:
    """What a released client would break on; empty when the current protos are compatible."""
    problems: list[str] = []
    for name, old in released.items():
        new = current.get(name)
        if new is None:
            problems.append(f"{name} was removed")
            continue
        new_msgs = dict(_messages(new.package, new.message_type))
        for full, msg in _messages(old.package, old.message_type):
            if full not in new_msgs:
                problems.append(f"message {full} was removed")
                continue
            fields = {f.number: f for f in new_msgs[full].field}
            for f in msg.field:
                g = fields.get(f.number)
                if g is None:
                    problems.append(f"{full}: field {f.number} ({f.name}) was removed")
                elif (g.name, g.type, g.type_name, g.label) != (f.name, f.type, f.type_name, f.label):
                    problems.append(f"{full}: field {f.number} ({f.name}) changed name, type or label")
                elif g.HasField("oneof_index") != f.HasField("oneof_index"):
                    problems.append(f"{full}: field {f.number} ({f.name}) moved into or out of a oneof")
        new_enums = {e.name: {v.number: v.name for v in e.value} for e in new.enum_type}
        for e in old.enum_type:
            for v in e.value:
                if new_enums.get(e.name, {}).get(v.number) != v.name:
                    problems.append(f"enum {e.name}: value {v.number} ({v.name}) was removed or renamed")
        new_services = {s.name: {m.name: m for m in s.method} for s in new.service}
        for s in old.service:
            for m in s.method:
                n = new_services.get(s.name, {}).get(m.name)
                if n is None:
                    problems.append(f"rpc {s.name}.{m.name} was removed")
                elif (n.input_type, n.output_type, n.client_streaming, n.server_streaming) != (
                    m.input_type,
                    m.output_type,
                    m.client_streaming,
                    m.server_streaming,
                ):
                    problems.append(f"rpc {s.name}.{m.name} changed its types or streaming")
    return problems


def test_current_protos_are_compatible_with_the_released_ones() -> None:
    released = _released()
    assert set(released) == {"lightllm/v1/generation.proto", "lightllm/shard/v1/shard.proto"}
    assert incompatibilities(released, _current()) == []


def test_the_check_catches_reused_numbers_and_removals() -> None:
    current = _current()
    gen = current["lightllm/v1/generation.proto"]
    sampling = next(m for m in gen.message_type if m.name == "SamplingParams")
    sampling.field[3].number = 40  # min_p renumbered: its old number is free for reuse
    usage = next(m for m in gen.message_type if m.name == "Usage")
    usage.field[0].type = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    methods = gen.service[0].method
    del methods[[m.name for m in methods].index("Abort")]
    problems = "\n".join(incompatibilities(_released(), current))
    assert "SamplingParams: field 4 (min_p) was removed" in problems
    assert "Usage: field 1 (prompt_tokens) changed" in problems
    assert "rpc Generation.Abort was removed" in problems
