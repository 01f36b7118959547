#!/usr/bin/env python3
"""Writes a copy of a quantized GGUF with every quantized tensor in f16.

    python3 benches/dequantize-gguf.py IN.gguf OUT.gguf

A bigger, slower model of the same vocabulary, for measuring speculative
decoding with the original as its draft model (the demo model is the only
one this project's machines can fetch). Needs `pip install gguf numpy`.
"""
import sys

import gguf
import numpy as np
from gguf.quants import dequantize

src, dst = sys.argv[1], sys.argv[2]
reader = gguf.GGUFReader(src)
arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
writer = gguf.GGUFWriter(dst, arch)
for field in reader.fields.values():
    # The writer adds the architecture and the GGUF header fields itself.
    if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
        continue
    if field.name == gguf.Keys.General.FILE_TYPE:
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        continue
    kind = field.types[0]
    sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
for t in reader.tensors:
    plain = t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    data = t.data if plain else dequantize(t.data, t.tensor_type).astype(np.float16)
    writer.add_tensor(t.name, data)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
