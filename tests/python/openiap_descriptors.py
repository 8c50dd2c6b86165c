"""Prints the message descriptors the installed `openiap` package carries.

Usage: python openiap_descriptors.py

One JSON object: {message name: {field name: [number, type, repeated]}},
where type is the .proto scalar name or the message's short name, read
from the package's generated *_pb2 modules (its serialized descriptors).
"""

import importlib
import json

from google.protobuf.descriptor import FieldDescriptor

SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
}

out = {}
for module in ["ace", "base", "querys", "queues", "watch", "workitems"]:
    descriptor = importlib.import_module(f"proto.{module}_pb2").DESCRIPTOR
    for name, message in descriptor.message_types_by_name.items():
        fields = {}
        for f in message.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                kind = f.message_type.name
            elif f.type == FieldDescriptor.TYPE_ENUM:
                kind = f.enum_type.name
            else:
                kind = SCALARS.get(f.type, f"type{f.type}")
            # Newer protobuf releases have is_repeated and no label.
            repeated = getattr(f, "is_repeated", None)
            if repeated is None:
                repeated = f.label == FieldDescriptor.LABEL_REPEATED
            fields[f.name] = [f.number, kind, bool(repeated)]
        out[name] = fields
print(json.dumps(out, sort_keys=True))
