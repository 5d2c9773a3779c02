"""Streaming tensor files: safetensors read by memory map, written one tensor at a time.

We parse the (simple, documented) safetensors layout ourselves rather than going through a
framework binding because numpy has no bfloat16 (the published weights are bf16) and because
a memory map lets a 470 GB checkpoint be converted with about one tensor in RAM above the
result, and lets a process read only the slices its devices hold. `.bin` shards go through
`torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import zipfile

import ml_dtypes
import numpy as np

from deepseek_jax.errors import UserError

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


# A header past this is not a safetensors header (the spec caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


def read_header(path: str) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts. Every way a
    file can be damaged (cut short, a header that is not JSON or claims an absurd length, an
    offset past the end) is a UserError naming the file and, where there is one, the tensor."""
    size_on_disk = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UserError(f"{path}: {size_on_disk} bytes, too short for a safetensors header")
        (size,) = struct.unpack("<Q", prefix)
        if size > min(MAX_HEADER_BYTES, size_on_disk - 8):
            raise UserError(
                f"{path}: the header claims {size:,} bytes but the file holds {size_on_disk:,}: "
                "the file is truncated or not safetensors; download it again"
            )
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: the header is not JSON ({e}): download it again") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the header is not a JSON object: download it again")
    header.pop("__metadata__", None)
    data_bytes = size_on_disk - 8 - size
    for key, info in header.items():
        check_entry(path, key, info, data_bytes)
    return header, 8 + size


def check_entry(path: str, key: str, info, data_bytes: int) -> None:
    """One header entry is well formed and its bytes lie inside the file."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        count = math.prod(int(n) for n in shape)
    except (TypeError, KeyError, ValueError):
        raise UserError(
            f"{path}: tensor {key!r} has a malformed header entry {info!r}: download it again"
        ) from None
    if dtype not in DTYPES:
        raise UserError(
            f"{path}: tensor {key!r} has dtype {dtype!r}, which we do not read "
            f"(known: {sorted(DTYPES)}): convert the checkpoint to bf16 or fp32"
        )
    if not 0 <= begin <= end or end - begin != count * DTYPES[dtype].itemsize:
        raise UserError(
            f"{path}: tensor {key!r} spans bytes [{begin}, {end}), which does not hold its "
            f"shape {shape} of {dtype}: the file is damaged; download it again"
        )
    if end > data_bytes:
        raise UserError(
            f"{path}: tensor {key!r} ends at byte {end:,} of the data but the file holds "
            f"{data_bytes:,}: the file is truncated; download it again"
        )


class SafetensorsFile:
    """Lazy access to one .safetensors file: `file[key]` is a read-only memory map of that
    tensor alone. Slicing it before copying reads only the pages the slice touches, and the
    map is unmapped when the last view of it goes, so the file's pages do not pile up in the
    process's memory over a load (peak: about one tensor)."""

    def __init__(self, path: str):
        self.path = path
        self.header, self.data_start = read_header(path)

    def keys(self) -> list[str]:
        return list(self.header)

    def __getitem__(self, key: str) -> np.ndarray:
        info = self.header[key]
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end == begin:  # np.memmap cannot map zero bytes
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype, mode="r", offset=self.data_start + begin, shape=shape)


class TorchBinFile:
    """A PyTorch `.bin` shard, loaded with `torch.load(weights_only=True)` (no pickle code).

    A zip `.bin` (torch >= 1.6) is memory-mapped; a legacy one cannot be, so it is read
    whole (still `weights_only=True`): one shard in memory, never the whole checkpoint."""

    def __init__(self, path: str):
        try:
            import torch  # noqa: PLC0415  (torch is needed for .bin files only)
        except ImportError:
            raise UserError(
                f"{path} is a PyTorch .bin file: `pip install torch` to read it, or convert the "
                "checkpoint to safetensors"
            ) from None
        self.path = path
        try:
            self._tensors = torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
        except Exception as e:  # torch raises many types for one cause: not a readable file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{path}: torch.load(weights_only=True) cannot read it ({first[:200]}): "
                "re-download it, or convert it to safetensors where it was made"
            ) from None
        if not isinstance(self._tensors, dict):
            raise UserError(f"{path}: holds a {type(self._tensors).__name__}, not a state dict")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __getitem__(self, key: str) -> np.ndarray:
        import torch  # noqa: PLC0415

        t = self._tensors[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class TensorDirectory:
    """All tensors of an HF checkpoint dir: sharded or not, safetensors or .bin.

    `bytes_read` counts the bytes callers copied out of it (they add what they read), so a
    test can see that a process read only its own shards."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files: dict[str, SafetensorsFile | TorchBinFile] = {}
        self.location: dict[str, str] = {}
        self.bytes_read = 0
        for index_name, opener in (
            ("model.safetensors.index.json", SafetensorsFile),
            ("pytorch_model.bin.index.json", TorchBinFile),
        ):
            index_path = os.path.join(directory, index_name)
            if os.path.exists(index_path):
                self._open_index(index_path, opener)
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
        raise UserError(
            f"{directory}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json):"
            " give an HF checkpoint directory"
        )

    def _open_index(self, index_path: str, opener) -> None:
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
            raise UserError(
                f"{index_path}: not a JSON index with a weight_map: download it again"
            ) from None
        for name in sorted(set(weight_map.values())):
            path = os.path.join(self.directory, name)
            if not os.path.exists(path):
                key = next(k for k, v in weight_map.items() if v == name)
                raise UserError(
                    f"{index_path}: tensor {key!r} is in {name}, which is missing: download it"
                )
            self.files[name] = opener(path)
        for key, name in weight_map.items():
            if key not in self.files[name].keys():
                raise UserError(
                    f"{index_path} puts tensor {key!r} in {name}, which does not hold it: the "
                    "index and the shards are from different downloads"
                )
        self.location = dict(weight_map)

    def keys(self) -> set[str]:
        return set(self.location)

    def shape(self, key: str) -> tuple[int, ...]:
        file = self.files[self.location[key]]
        if isinstance(file, SafetensorsFile):
            return tuple(file.header[key]["shape"])
        return tuple(file[key].shape)

    def file_of(self, key: str) -> str:
        return os.path.join(self.directory, self.location[key])

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
                shutil.copyfileobj(data, out, length=4 << 20)  # a small buffer: RSS
            os.remove(part)
            names.append(name)
            weight_map.update({k: name for k in header})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
            names.append("model.safetensors.index.json")
        return names
