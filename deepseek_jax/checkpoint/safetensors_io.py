"""Streaming tensor files: safetensors read by memory map, written one tensor at a time.

We parse the (simple, documented) safetensors layout ourselves rather than going through a
framework binding because numpy has no bfloat16 (the published weights are bf16) and because
a memory map lets a 470 GB checkpoint be converted with about one tensor in RAM above the
result. `.bin` shards go through `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsFile:
    """Lazy access to one .safetensors file: `file[key]` is a read-only memory-mapped array."""

    def __init__(self, path: str):
        self.path = path
        self.header, self.data_start = read_header(path)
        self._map = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.header)

    def __getitem__(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = (self.data_start + o for o in info["data_offsets"])
        return self._map[begin:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])


class TorchBinFile:
    """A PyTorch `.bin` shard, loaded with `torch.load(weights_only=True)` (no pickle code)."""

    def __init__(self, path: str):
        try:
            import torch  # noqa: PLC0415  (torch is needed for .bin files only)
        except ImportError as e:
            raise ImportError(
                f"{path} is a PyTorch .bin file: `pip install torch` to read it, or convert the "
                "checkpoint to safetensors"
            ) from e
        self.path = path
        self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __getitem__(self, key: str) -> np.ndarray:
        import torch  # noqa: PLC0415

        t = self._tensors[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class TensorDirectory:
    """All tensors of an HF checkpoint dir: sharded or not, safetensors or .bin."""

    def __init__(self, directory: str):
        self.files: dict[str, SafetensorsFile | TorchBinFile] = {}
        self.location: dict[str, str] = {}
        for index_name, opener in (
            ("model.safetensors.index.json", SafetensorsFile),
            ("pytorch_model.bin.index.json", TorchBinFile),
        ):
            index_path = os.path.join(directory, index_name)
            if os.path.exists(index_path):
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
                for name in sorted(set(weight_map.values())):
                    self.files[name] = opener(os.path.join(directory, name))
                self.location = dict(weight_map)
                return
        for name, opener in (
            ("model.safetensors", SafetensorsFile),
            ("pytorch_model.bin", TorchBinFile),
        ):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                self.files[name] = opener(path)
                self.location = {k: name for k in self.files[name].keys()}
                return
        raise FileNotFoundError(
            f"{directory}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
        )

    def keys(self) -> set[str]:
        return set(self.location)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.files[self.location[key]][key]


class ShardedWriter:
    """Writes tensors one at a time into safetensors shards of at most `max_shard_bytes`.

    Each shard's data goes to a temporary file first (the header must precede the data and
    is only known at the end), so memory holds one tensor at a time.
    """

    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[tuple[dict, str]] = []  # (header, temp data path)
        self.total_bytes = 0
        self._open_shard()

    def _open_shard(self):
        fd, path = tempfile.mkstemp(dir=self.directory, suffix=".part")
        self._data = os.fdopen(fd, "wb")
        self._header: dict = {}
        self._size = 0
        self.shards.append((self._header, path))

    def add(self, key: str, array: np.ndarray):
        array = np.ascontiguousarray(array)
        if self._size and self._size + array.nbytes > self.max_shard_bytes:
            self._data.close()
            self._open_shard()
        self._header[key] = {
            "dtype": CODES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [self._size, self._size + array.nbytes],
        }
        self._data.write(array.tobytes())
        self._size += array.nbytes
        self.total_bytes += array.nbytes

    def close(self) -> list[str]:
        """Assembles the shards and the index; returns the file names written."""
        self._data.close()
        count = len(self.shards)
        names, weight_map = [], {}
        for i, (header, part) in enumerate(self.shards):
            name = (
                "model.safetensors"
                if count == 1
                else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            )
            header_bytes = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
            header_bytes += b" " * (-len(header_bytes) % 8)  # 8-byte aligned data, as the spec asks
            with open(os.path.join(self.directory, name), "wb") as out, open(part, "rb") as data:
                out.write(struct.pack("<Q", len(header_bytes)))
                out.write(header_bytes)
                shutil.copyfileobj(data, out, length=64 << 20)
            os.remove(part)
            names.append(name)
            weight_map.update({k: name for k in header})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
            names.append("model.safetensors.index.json")
        return names
