"""Writes the protobuf descriptors of Triton's gRPC API (grpc_service.proto and
model_config.proto, as compiled into the tritonclient wheel that matches our
tritonserver) as one serialized FileDescriptorSet, which loadgen's build script turns
into a tonic client. Rerun it when the tritonclient version in tests/requirements.txt
changes:

    .deps/venv/bin/python loadgen/proto/extract_descriptors.py
"""

from importlib.metadata import version
from pathlib import Path

from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2

OUTPUT = Path(__file__).with_name(f"triton-grpc-{version('tritonclient')}.binpb")


def with_dependencies(file, seen):
    """The file's descriptor after those of its imports, each once."""
    for dependency in file.dependencies:
        yield from with_dependencies(dependency, seen)
    if file.name not in seen:
        seen.add(file.name)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        yield proto


def main():
    descriptors = descriptor_pb2.FileDescriptorSet()
    descriptors.file.extend(with_dependencies(service_pb2.DESCRIPTOR, set()))
    OUTPUT.write_bytes(descriptors.SerializeToString(deterministic=True))
    names = ", ".join(file.name for file in descriptors.file)
    print(f"wrote {OUTPUT} ({names})")


if __name__ == "__main__":
    main()
