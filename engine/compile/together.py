"""C kernels compiled together: one run of the C compiler for many kernels, each then cut out
of the one object file as machine code that runs wherever it is loaded.

Starting the C compiler costs about 30 ms a kernel on this kind of machine whatever the
kernel (a cold graphs/cnn.yaml compiles 102: 4.4 s one by one, 1.2 s as one file). Each
kernel's function gets a name of its own (``#define``), its own section
(``-ffunction-sections``); its piece is its code followed by the constants it loads, the
code's references to them (x86-64 PC-relative relocations) resolved for that layout. A
kernel whose code refers to anything else (another function, a library, a relocation of
another kind) gets no piece: its caller compiles it alone, as before. This module knows
nothing of tinygrad: engine/compile/tinygrad_door.py hands it sources and a command.
"""

from __future__ import annotations

import re
import struct
import subprocess

PREFIX = "dlgraph_kernel_"
_FUNCTION = re.compile(r"^void\s+(\w+)\s*\(", re.M)
_SECTION = struct.Struct("<IIQQQQIIQQ")     # an ELF64 section header
_SYMBOL = struct.Struct("<IBBHQQ")          # an ELF64 symbol
_RELA = struct.Struct("<QQq")               # an ELF64 relocation with addend
_PROGBITS, _SYMTAB, _RELA_T, _NOBITS, _REL = 1, 2, 4, 8, 9
_EXEC = 0x4
_PC32, _PLT32 = 2, 4                         # x86-64: S + A - P, 32 bits


def compile_together(command: list[str], sources: list[str]) -> list[bytes | None]:
    """Each C source (one kernel: ``void name(...)``, possibly after typedefs) compiled by
    one run of ``command`` (a C compiler reading standard input and writing an x86-64 ELF
    object to standard output): its machine code, position-independent, the function
    first; None where it could not be cut out (compile that one alone). An error of the
    compiler leaves every one None."""
    names = [m.group(1) if (m := _FUNCTION.search(src)) else None for src in sources]
    text = "\n".join(f"#define {name} {PREFIX}{i}\n{src}\n#undef {name}"
                     for i, (name, src) in enumerate(zip(names, sources, strict=True)) if name)
    try:
        obj = subprocess.run([*command, "-ffunction-sections"], input=text.encode(),
                             capture_output=True, check=True).stdout
        pieces = cut(obj, len(sources))
    except (OSError, subprocess.CalledProcessError, ValueError, struct.error, IndexError):
        return [None] * len(sources)
    return [p if name else None for p, name in zip(pieces, names, strict=True)]


def cut(obj: bytes, n: int) -> list[bytes | None]:
    """The pieces of functions ``PREFIX0`` .. ``PREFIX{n-1}`` of an ELF64 object."""
    if obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] != 1 or \
            struct.unpack_from("<H", obj, 0x12)[0] != 62:        # 64-bit, little, x86-64
        raise ValueError("not an x86-64 ELF64 object")
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shnum, shstrndx = struct.unpack_from("<HH", obj, 0x3C)
    secs = [_SECTION.unpack_from(obj, shoff + i * _SECTION.size) for i in range(shnum)]
    names = obj[secs[shstrndx][4]:secs[shstrndx][4] + secs[shstrndx][5]]
    name = [names[s[0]:names.index(b"\0", s[0])].decode() for s in secs]
    data = [obj[s[4]:s[4] + s[5]] for s in secs]
    symtab = next((i for i, s in enumerate(secs) if s[1] == _SYMTAB), None)
    syms = [] if symtab is None else [_SYMBOL.unpack(data[symtab][j:j + _SYMBOL.size])
                                      for j in range(0, len(data[symtab]), _SYMBOL.size)]
    relocs: dict[int, list] = {}
    for i, s in enumerate(secs):
        if s[1] == _REL or (s[1] == _RELA_T and not name[s[7]].startswith(".text.")
                            and name[s[7]] != ".eh_frame"):
            raise ValueError(f"relocations in {name[s[7]]}: not cut")
        if s[1] == _RELA_T and name[s[7]].startswith(".text."):
            relocs[s[7]] = [_RELA.unpack(data[i][j:j + _RELA.size])
                            for j in range(0, len(data[i]), _RELA.size)]
    where = {nm: i for i, nm in enumerate(name)}
    return [_piece(where.get(f".text.{PREFIX}{k}"), secs, data, syms, relocs) for k in range(n)]


def _piece(sec: int | None, secs, data, syms, relocs) -> bytes | None:
    """One function's code, then each section of constants it refers to (aligned), with
    its references resolved; None where one points elsewhere."""
    if sec is None:
        return None
    image, placed = bytearray(data[sec]), {}
    fixes = []
    for offset, info, addend in relocs.get(sec, []):
        kind, sym = info & 0xFFFFFFFF, syms[info >> 32]
        target = sym[3]
        if kind not in (_PC32, _PLT32) or not 0 < target < len(secs) or \
                secs[target][1] != _PROGBITS or secs[target][2] & _EXEC:
            return None
        if target not in placed:
            align = max(secs[target][8], 1)
            image += b"\0" * (-len(image) % align)
            placed[target] = len(image)
            image += data[target]
        fixes.append((offset, placed[target] + sym[4] + addend - offset))
    for offset, value in fixes:
        if not -(1 << 31) <= value < (1 << 31):
            return None
        struct.pack_into("<i", image, offset, value)
    return bytes(image)
