"""The dtypes that travel on the wire, by their JSON and safetensors names."""

from __future__ import annotations

import numpy as np
import torch

# JSON name -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

# safetensors name -> JSON name
SAFETENSORS_NAMES: dict[str, str] = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "BOOL": "bool",
}

# numpy dtype used to build a tensor from a JSON number list (bfloat16 goes through float32)
NUMPY_FOR_LIST: dict[str, type[np.generic]] = {
    # float16 and bfloat16 through float32, as torch makes them of Python floats (numpy's
    # float16 rounds a double directly: one just past a tie would get another value)
    "float16": np.float32,
    "bfloat16": np.float32,
    "float32": np.float32,
    "float64": np.float64,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "bool": np.bool_,
}

FLOATING = frozenset({"float16", "bfloat16", "float32", "float64"})
MAX_DIMS = 32

