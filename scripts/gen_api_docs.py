"""Generate docs/api.md, the gRPC API reference, from protos/ and their comments.

    python scripts/gen_api_docs.py          # regenerate docs/api.md
    python scripts/gen_api_docs.py --check  # exit 1 if docs/api.md differs from a fresh run

The pinned protoc of grpcio-tools (the same one gen_protos.py uses) compiles protos/ into a
FileDescriptorSet *with source info*; the leading comments attached to every service,
method, message, field, enum and value become the text. Offline, no plugin needed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "docs" / "api.md"

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    F.TYPE_DOUBLE: "double",
    F.TYPE_FLOAT: "float",
    F.TYPE_INT64: "int64",
    F.TYPE_UINT64: "uint64",
    F.TYPE_INT32: "int32",
    F.TYPE_FIXED64: "fixed64",
    F.TYPE_FIXED32: "fixed32",
    F.TYPE_BOOL: "bool",
    F.TYPE_STRING: "string",
    F.TYPE_BYTES: "bytes",
    F.TYPE_UINT32: "uint32",
    F.TYPE_SFIXED32: "sfixed32",
    F.TYPE_SFIXED64: "sfixed64",
    F.TYPE_SINT32: "sint32",
    F.TYPE_SINT64: "sint64",
}
# Tags of FileDescriptorProto / DescriptorProto / ServiceDescriptorProto / EnumDescriptorProto
# in source-info paths.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
SERVICE_METHOD, ENUM_VALUE = 2, 2


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *protos,
            ],
            check=False,
            cwd=PROTO_ROOT,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            sys.stderr.write(result.stdout + result.stderr)
            raise SystemExit(f"protoc failed with exit code {result.returncode}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class Comments:
    """Leading comments of one file by source-info path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}

    def get(self, *path: int) -> str:
        text = self._by_path.get(tuple(path), "")
        return " ".join(line.strip() for line in text.strip().splitlines())


def cell(text: str) -> str:
    return text.replace("|", "\\|") or " "


def anchor(full_name: str) -> str:
    return full_name.lower().replace(".", "")


def type_name(field: descriptor_pb2.FieldDescriptorProto, maps: dict[str, tuple[str, str]]) -> str:
    if field.type_name:
        name = field.type_name.lstrip(".")
        if name in maps:
            key, value = maps[name]
            return f"map<{key}, {value}>"
        if name.startswith("loadtest."):
            return f"[{name.rsplit('.', 1)[-1]}](#{anchor(name)})"
        return f"`{name}`"
    return SCALARS[field.type]


def _collect_maps(prefix: str, message: descriptor_pb2.DescriptorProto, maps: dict[str, tuple[str, str]]) -> None:
    """Map entries are nested messages with options.map_entry: shown as map<K, V>."""
    for nested in message.nested_type:
        full = f"{prefix}.{nested.name}"
        if nested.options.map_entry:
            k, v = nested.field
            value = SCALARS.get(v.type, "") or v.type_name.lstrip(".").rsplit(".", 1)[-1]
            maps[full] = (SCALARS.get(k.type, k.type_name.lstrip(".")), value)
        _collect_maps(full, nested, maps)


def _ref(full: str, stream: bool) -> str:
    return ("stream " if stream else "") + f"[{full.rsplit('.', 1)[-1]}](#{anchor(full)})"


class _FileWriter:
    """Markdown sections of one .proto file."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto, maps: dict[str, tuple[str, str]]) -> None:
        self.file = file
        self.maps = maps
        self.c = Comments(file)
        self.out: list[str] = [f"## {file.name}", ""]

    def write(self) -> list[str]:
        f = self.file
        for si, service in enumerate(f.service):
            self.out += [f"### {f.package}.{service.name}", "", self.c.get(FILE_SERVICE, si), ""]
            self.out += ["| method | request | response | description |", "|---|---|---|---|"]
            for mi, method in enumerate(service.method):
                req = _ref(method.input_type.lstrip("."), method.client_streaming)
                resp = _ref(method.output_type.lstrip("."), method.server_streaming)
                desc = self.c.get(FILE_SERVICE, si, SERVICE_METHOD, mi)
                self.out.append(f"| `{method.name}` | {req} | {resp} | {cell(desc)} |")
            self.out.append("")
        for mi, msg in enumerate(f.message_type):
            self.message(msg, f.package, (FILE_MESSAGE, mi))
        for ei, enum in enumerate(f.enum_type):
            self.enum(enum, f.package, (FILE_ENUM, ei))
        return self.out

    def message(self, msg: descriptor_pb2.DescriptorProto, prefix: str, path: tuple[int, ...]) -> None:
        full = f"{prefix}.{msg.name}"
        if msg.options.map_entry:
            return
        self.out += [f"### {full}", "", self.c.get(*path), ""]
        if msg.field:
            self.out += ["| field | number | type | description |", "|---|---|---|---|"]
            for fi, field in enumerate(msg.field):
                is_map = field.type_name.lstrip(".") in self.maps
                label = "repeated " if field.label == F.LABEL_REPEATED and not is_map else ""
                oneof = ""
                if field.HasField("oneof_index") and not field.proto3_optional:
                    oneof = f" (oneof `{msg.oneof_decl[field.oneof_index].name}`)"
                optional = "optional " if field.proto3_optional else ""
                desc = self.c.get(*path, MESSAGE_FIELD, fi)
                kind = f"{optional}{label}{type_name(field, self.maps)}"
                self.out.append(f"| `{field.name}` | {field.number} | {kind} | {cell(desc + oneof)} |")
        else:
            self.out.append("(no fields)")
        self.out.append("")
        for ei, enum in enumerate(msg.enum_type):
            self.enum(enum, full, (*path, MESSAGE_ENUM, ei))
        for ni, nested in enumerate(msg.nested_type):
            self.message(nested, full, (*path, MESSAGE_NESTED, ni))

    def enum(self, enum: descriptor_pb2.EnumDescriptorProto, prefix: str, path: tuple[int, ...]) -> None:
        self.out += [f"### {prefix}.{enum.name}", "", self.c.get(*path), ""]
        self.out += ["| value | number | description |", "|---|---|---|"]
        for vi, v in enumerate(enum.value):
            self.out.append(f"| `{v.name}` | {v.number} | {cell(self.c.get(*path, ENUM_VALUE, vi))} |")
        self.out.append("")


def render(fds: descriptor_pb2.FileDescriptorSet) -> str:
    # The user-facing service first, then the agent protocol, then the shared messages.
    files = sorted(
        (f for f in fds.file if f.package.startswith("loadtest.")),
        key=lambda f: (not f.service, not f.name.endswith("run_service.proto"), f.name),
    )
    maps: dict[str, tuple[str, str]] = {}
    for f in files:
        for m in f.message_type:
            _collect_maps(f"{f.package}.{m.name}", m, maps)
    out = [
        "# gRPC API reference",
        "",
        "<!-- Generated by scripts/gen_api_docs.py from protos/ and their comments. Do not edit by hand:",
        "     change the .proto comments and run `python scripts/gen_api_docs.py`. -->",
        "",
        "The controller serves these services on its gRPC port, with server reflection and",
        "`grpc.health.v1.Health`. JSON examples (grpcurl, buf curl) are in the README; the field",
        "names below are the proto names (JSON also accepts lowerCamelCase).",
        "",
    ]
    for f in files:
        out += _FileWriter(f, maps).write()
    text = "\n".join(out)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md is stale")
    args = parser.parse_args()
    fresh = render(descriptor_set())
    if args.check:
        if not OUT.exists() or OUT.read_text() != fresh:
            print("docs/api.md is stale: run `python scripts/gen_api_docs.py`", file=sys.stderr)
            return 1
        print("docs/api.md is up to date")
        return 0
    OUT.write_text(fresh)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
