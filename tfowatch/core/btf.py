"""Minimal reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`).

tfowatch compiles its BPF programs against kernel headers that may belong to
another kernel (Debian's 6.1 headers on a 6.18 host), so every kernel struct
field it reads is located here, in the running kernel's own type information,
and handed to the C code as a byte/bit offset.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from functools import cache
from pathlib import Path

BTF_MAGIC = 0xEB9F
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

# Bytes that follow the 12-byte common header, per kind: (fixed, per vlen item).
_EXTRA = {
    KIND_INT: (4, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12), KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8), KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0), KIND_ENUM64: (0, 12),
}
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


class BtfError(Exception):
    """The BTF blob is unreadable, or a requested type or member is not in it."""


@dataclass(frozen=True)
class Field:
    """Where a member lives inside its outermost struct."""

    bit_offset: int
    bit_size: int  # 0 unless the member is a bitfield
    size: int  # byte size of the member's type

    @property
    def offset(self) -> int:
        if self.bit_offset % 8:
            raise BtfError("bitfield has no byte offset; use bit_offset")
        return self.bit_offset // 8

    @property
    def is_bitfield(self) -> bool:
        return self.bit_size != 0


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    kind_flag: bool
    size_or_type: int
    pos: int  # offset of the extra data
    vlen: int


class Btf:
    """Types of one BTF blob, indexed by id, with struct lookup by name."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF blob too short")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._strs = hdr_len + str_off
        self._str_end = self._strs + str_len
        # Arrays of ints, not lists of objects: a kernel has ~150k types, and what the parse
        # allocates stays in the daemon's heap after it is dropped.
        self._types = array("I", [0])  # each type's header position; id 0 is void
        self._func_names = array("I")  # string offsets of FUNC names (sorted after the index)
        self._structs: dict[str, int] = {}
        self._index(hdr_len + type_off, hdr_len + type_off + type_len)

    @classmethod
    def load(cls, path: Path = VMLINUX_BTF) -> Btf:
        """The BTF at `path`, parsed once per process (the kernel's does not change while it
        runs; parsing its ~150k types is most of the daemon's startup after the compile)."""
        return _load(path)

    @staticmethod
    def forget() -> None:
        """Drop the parsed BTF kept by load() (~10 MB): once the programs are built, nothing
        reads it again."""
        _load.cache_clear()

    def _name(self, off: int) -> str:
        start = self._strs + off
        end = self._data.index(b"\0", start, self._str_end)
        return self._data[start:end].decode()

    def _index(self, pos: int, end: int) -> None:
        """Every type's position, struct ids by name and the FUNC names' offsets. A type is
        decoded only when asked for (_type)."""
        data, types, funcs, unpack = self._data, self._types, self._func_names, struct.unpack_from
        while pos < end:
            name_off, info, size_or_type = unpack("<III", data, pos)
            kind = (info >> 24) & 0x1F
            if kind == KIND_STRUCT and name_off and size_or_type:
                self._structs.setdefault(self._name(name_off), len(types))
            elif kind == KIND_FUNC:
                funcs.append(name_off)
            types.append(pos)
            fixed, per_item = _EXTRA.get(kind, (0, 0))
            pos += 12 + fixed + per_item * (info & 0xFFFF)
        self._func_names = array("I", sorted(funcs))

    def has_function(self, name: str) -> bool:
        """Whether BTF has a FUNC `name` (pahole emits one for each function with an ftrace
        entry: one a kprobe can attach to)."""
        # BTF keeps each string once: find it in the string section, then among FUNC names.
        at = self._data.find(b"\0" + name.encode() + b"\0", self._strs - 1, self._str_end)
        if at < 0:
            return False
        off = at + 1 - self._strs
        i = bisect_left(self._func_names, off)
        return i < len(self._func_names) and self._func_names[i] == off

    def _type(self, type_id: int) -> _Type | None:
        if type_id == 0:
            return None
        pos = self._types[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self._data, pos)
        kind = (info >> 24) & 0x1F
        name = self._name(name_off) if name_off and kind in (KIND_STRUCT, KIND_UNION, KIND_TYPEDEF) else ""
        return _Type(kind, name, bool(info >> 31), size_or_type, pos + 12, info & 0xFFFF)

    def _resolve(self, type_id: int) -> _Type:
        """Skip typedefs and qualifiers."""
        t = self._type(type_id)
        while t is not None and t.kind in _MODIFIERS:
            t = self._type(t.size_or_type)
        if t is None:
            raise BtfError("member of type void")
        return t

    def _size(self, type_id: int) -> int:
        t = self._resolve(type_id)
        if t.kind == KIND_ARRAY:
            elem, _idx, nelems = struct.unpack_from("<III", self._data, t.pos)
            return int(self._size(elem) * nelems)
        if t.kind == KIND_PTR:
            return 8
        return int(t.size_or_type)

    def _members(self, t: _Type) -> list[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size) of a struct or union."""
        out = []
        for i in range(t.vlen):
            name_off, type_id, off = struct.unpack_from("<III", self._data, t.pos + 12 * i)
            bit_size, bit_off = (off >> 24, off & 0xFFFFFF) if t.kind_flag else (0, off)
            name = self._name(name_off) if name_off else ""
            out.append((name, type_id, bit_off, bit_size))
        return out

    def _find(self, t: _Type, name: str) -> tuple[int, int, int] | None:
        """Member `name` of t, looking through anonymous struct/union members."""
        for mname, type_id, bit_off, bit_size in self._members(t):
            if mname == name:
                return type_id, bit_off, bit_size
            if not mname:
                inner = self._resolve(type_id)
                if inner.kind in (KIND_STRUCT, KIND_UNION):
                    found = self._find(inner, name)
                    if found:
                        return found[0], bit_off + found[1], found[2]
        return None

    def has_struct(self, name: str) -> bool:
        return name in self._structs

    def struct_size(self, name: str) -> int:
        if name not in self._structs:
            raise BtfError(f"struct {name} not in BTF")
        return self._size(self._structs[name])

    def field(self, struct_name: str, path: str) -> Field:
        """Locate `struct_name.path` (dotted, e.g. "__sk_common.skc_net.net")."""
        if struct_name not in self._structs:
            raise BtfError(f"struct {struct_name} not in BTF")
        t = self._resolve(self._structs[struct_name])
        bits = 0
        type_id, bit_size = self._structs[struct_name], 0
        for part in path.split("."):
            if t.kind not in (KIND_STRUCT, KIND_UNION):
                raise BtfError(f"{struct_name}.{path}: {part} is inside a non-struct")
            found = self._find(t, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path}")
            type_id, bit_off, bit_size = found
            bits += bit_off
            t = self._resolve(type_id)
        size = self._size(type_id)
        if not bit_size and t.kind == KIND_INT:
            # Older BTF encodes bitfields in the INT type itself (kind_flag unset).
            (enc,) = struct.unpack_from("<I", self._data, t.pos)
            nr_bits, int_off = enc & 0xFF, (enc >> 16) & 0xFF
            if nr_bits != size * 8:
                bits, bit_size = bits + int_off, nr_bits
        return Field(bits, bit_size, size)

    def has_field(self, struct_name: str, path: str) -> bool:
        try:
            self.field(struct_name, path)
        except BtfError:
            return False
        return True


@cache
def _load(path: Path) -> Btf:
    try:
        return Btf(path.read_bytes())
    except OSError as exc:
        raise BtfError(f"cannot read BTF at {path}: {exc.strerror}") from exc
