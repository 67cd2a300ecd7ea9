"""``tf.train.Example`` message classes built from their schema with protobuf's descriptor API.

TFF's ``emnist_all.sqlite`` stores each example as a serialized tf.Example. TensorFlow's
own generated classes live in ``tensorflow.core.example``, and importing them imports
TensorFlow (seconds and hundreds of MB, and never allowed in a LiteRT device process);
TensorBoard's copy of the protos does not include example.proto. So the schema of
tensorflow/core/example/{feature,example}.proto is declared here, field for field, in a
private descriptor pool (no clash with TensorFlow's classes if both are loaded), and the
protobuf runtime parses the wire format.
"""

from __future__ import annotations

from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _field(message, name: str, number: int, kind: int, *, repeated: bool = False, type_name: str = "", oneof: int | None = None):
    field = message.field.add(name=name, number=number, type=kind)
    field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name:
        field.type_name = type_name
    if oneof is not None:
        field.oneof_index = oneof
    return field


def _schema() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="edgefl/tensorflow_example.proto", package="tensorflow", syntax="proto3")
    for name, kind in (("BytesList", _F.TYPE_BYTES), ("FloatList", _F.TYPE_FLOAT), ("Int64List", _F.TYPE_INT64)):
        field = _field(proto.message_type.add(name=name), "value", 1, kind, repeated=True)
        if kind != _F.TYPE_BYTES:
            field.options.packed = True
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    _field(feature, "bytes_list", 1, _F.TYPE_MESSAGE, type_name=".tensorflow.BytesList", oneof=0)
    _field(feature, "float_list", 2, _F.TYPE_MESSAGE, type_name=".tensorflow.FloatList", oneof=0)
    _field(feature, "int64_list", 3, _F.TYPE_MESSAGE, type_name=".tensorflow.Int64List", oneof=0)
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_MESSAGE, type_name=".tensorflow.Feature")
    _field(features, "feature", 1, _F.TYPE_MESSAGE, repeated=True, type_name=".tensorflow.Features.FeatureEntry")
    example = proto.message_type.add(name="Example")
    _field(example, "features", 1, _F.TYPE_MESSAGE, type_name=".tensorflow.Features")
    return proto


@cache
def _classes() -> dict[str, type]:
    pool = descriptor_pool.DescriptorPool()
    file = pool.Add(_schema()) or pool.FindFileByName("edgefl/tensorflow_example.proto")
    return {name: message_factory.GetMessageClass(file.message_types_by_name[name]) for name in file.message_types_by_name}


def example_class() -> type:
    """``tf.train.Example``: ``Example.FromString(blob).features.feature["pixels"].float_list.value``."""
    return _classes()["Example"]
