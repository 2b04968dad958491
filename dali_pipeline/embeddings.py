"""Embeddings out: the model's features and projections joined with the batch `index`, one row per observation.

A prediction is what `predict_step` returns: `{"features": (B, D), "projections": (B, P), "index": ...}`
(the reference's ContrastiveModule shape). `index` holds the batch's observation columns (the
loader's `index`: fov_name, well, track_id, t, id, parent_track_id, parent_id, z, y, x,
experiment, lineage_id, and marker in bag-of-channels mode) as columns or as a list of dicts; when
the prediction has none, the Lightning callback takes the batch's. A bare tensor is the features.

Formats (chosen by the file suffix, or `format=`):

* `.parquet`: one row per observation, the index columns, then each embedding as a fixed-size
  list column (`read_embeddings` gives the columns and (N, D) arrays back);
* `.zarr` / `.h5ad`: AnnData (the `anndata` extra) as the reference's EmbeddingWriter writes it:
  `obs` the index columns (fov_name without surrounding "/"), `X` the features (or the projections
  with `embedding_key="projections"`), `obsm["X_projections"]` (or `obsm["X_features"]`).

Under DDP every rank streams its rows to its own part file next to the output; at the end rank 0
merges the parts (round-robin by batch, which restores the index order of the predict sampler),
drops duplicate observations (padding of other samplers; the key is experiment, fov_name,
track_id, t and marker), writes the output to a temporary name and renames it into place
(atomic), and tells every rank whether it succeeded. An existing output is an error unless
`overwrite=True`, checked before predicting starts and again before the rename; even then only a
parquet or h5ad file, or a .zarr folder carrying this project's marker, is replaced.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sampler.atomic import H5AD, PARQUET, FileKind, atomic_output, check_target, write_marker

Format = Literal["parquet", "anndata"]
KEY_COLUMNS = ("experiment", "fov_name", "track_id", "t", "marker")
_RESERVED = ("index",)


def output_format(path: str | os.PathLike[str], format: str | None = None) -> Format:
    """"parquet" or "anndata" from `format` or the suffix (.parquet/.pq, .zarr/.h5ad)."""
    if format is not None:
        if format not in ("parquet", "anndata"):
            raise ValueError(f"format must be 'parquet' or 'anndata', got {format!r}")
        return format  # type: ignore[return-value]
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".zarr", ".h5ad"):
        return "anndata"
    raise ValueError(f"{path}: cannot tell the format from the suffix {suffix!r}; use .parquet, .zarr or .h5ad, "
                     "or pass format=")


def _kind(path: Path, format: Format) -> FileKind | None:
    """What an existing output must be for overwrite to replace it (None: a marked AnnData .zarr folder)."""
    if format == "parquet":
        return PARQUET
    return H5AD if path.suffix.lower() == ".h5ad" else None


def _check_target(path: Path, format: Format, overwrite: bool) -> None:
    check_target(path, overwrite, _kind(path, format))
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: the output folder does not exist")


# ---------------------------------------------------------------------- one prediction -> columns
def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


def _index_columns(index: Any, n: int) -> dict[str, np.ndarray]:
    if isinstance(index, Mapping):
        columns = {str(k): _as_numpy(v) for k, v in index.items()}
    elif isinstance(index, Sequence) and not isinstance(index, (str, bytes)):
        rows = list(index)
        if rows and not all(isinstance(r, Mapping) for r in rows):
            raise TypeError("index must be columns ({name: values}) or a list of dicts (one per observation)")
        names = list(rows[0]) if rows else []
        columns = {k: _as_numpy([_scalar(r[k]) for r in rows]) for k in names}
    else:
        raise TypeError(f"index must be columns ({{name: values}}) or a list of dicts, got {type(index).__name__}")
    for name, col in columns.items():
        if col.ndim != 1 or len(col) != n:
            raise ValueError(f"index column {name!r} has shape {col.shape}, the embeddings have {n} rows")
    if "fov_name" in columns:  # the reference strips the slashes of "/A/1/0"
        columns["fov_name"] = np.char.strip(columns["fov_name"].astype(str), "/").astype(object)
    return columns


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, (torch.Tensor, np.generic)) and getattr(value, "ndim", 0) == 0 else value


def prediction_table(prediction: Any, index: Any = None, keys: Sequence[str] | None = None) -> pa.Table:
    """One prediction as an Arrow table: index columns, then one fixed-size list column per embedding.

    `keys` selects the embeddings (default: every 1-D or 2-D array of the prediction but `index`).
    """
    if isinstance(prediction, (torch.Tensor, np.ndarray)):
        prediction = {"features": prediction}
    if not isinstance(prediction, Mapping):
        raise TypeError(f"a prediction is a dict (features, projections, index) or a tensor, got {type(prediction).__name__}")
    if index is None:
        index = prediction.get("index")
    if index is None:
        raise ValueError("the prediction has no 'index' (and no batch index was given): return batch['index'] "
                         "from predict_step, or use the EmbeddingWriter callback, which takes the batch's")
    if keys is None:
        keys = [k for k, v in prediction.items()
                if k not in _RESERVED and isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim in (1, 2)]
    if not keys:
        raise ValueError(f"the prediction has no embedding array (keys: {list(prediction)})")
    arrays = {}
    for k in keys:
        if k not in prediction:
            raise KeyError(f"the prediction has no {k!r} (keys: {list(prediction)})")
        a = _as_numpy(prediction[k])
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2:
            raise ValueError(f"{k!r} must be (B, D), got shape {a.shape}")
        arrays[k] = np.ascontiguousarray(a)
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"the embeddings have different numbers of rows: { {k: len(a) for k, a in arrays.items()} }")
    n = sizes.pop()
    columns = _index_columns(index, n)
    clash = sorted(set(columns) & set(arrays))
    if clash:
        raise ValueError(f"index columns {clash} have the names of embeddings")
    fields = {name: pa.array(col) for name, col in columns.items()}
    for k, a in arrays.items():
        flat = pa.array(a.reshape(-1))
        fields[k] = pa.FixedSizeListArray.from_arrays(flat, a.shape[1])
    return pa.table(fields)


# ---------------------------------------------------------------------- the writer
def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _torch_broadcast(obj: Any) -> Any:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _torch_barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _check_parts(parts: Path) -> None:
    """The ranks' scratch folder is removed after the merge: it may hold only rank parts (an earlier
    run's), so that a folder of that name with anything else in it is refused, never deleted."""
    if parts.is_symlink() or (parts.exists() and not parts.is_dir()):
        raise FileExistsError(f"{parts} exists and is not a folder of prediction parts; move it away or choose "
                              "another output path")
    if parts.is_dir():
        foreign = sorted(p.name for p in parts.iterdir() if not re.fullmatch(r"rank-\d{5}\.parquet", p.name))
        if foreign:
            raise FileExistsError(f"{parts} holds {foreign[:3]}{' ...' if len(foreign) > 3 else ''}, not prediction "
                                  "parts this project wrote; move it away or choose another output path")


class EmbeddingTable:
    """Rows of one rank, streamed to a part file; `close()` (on every rank) writes the one output.

    `rank`/`world_size` default to the initialised torch.distributed group (else 0/1); `barrier`
    and `broadcast` (of a picklable object from rank 0) default to torch.distributed's.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        format: str | None = None,
        overwrite: bool = False,
        embedding_key: str = "features",
        keys: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        barrier: Callable[[], None] | None = None,
        broadcast: Callable[[Any], Any] | None = None,
    ) -> None:
        self.path = Path(path).absolute()
        self.format = output_format(self.path, format)
        self.overwrite = overwrite
        self.embedding_key = embedding_key
        self.keys = None if keys is None else list(keys)
        r, w = _dist()
        self.rank = r if rank is None else int(rank)
        self.world_size = w if world_size is None else int(world_size)
        self._barrier = barrier or _torch_barrier
        self._broadcast = broadcast or _torch_broadcast
        _check_target(self.path, self.format, overwrite)
        self.parts = self.path.parent / f".{self.path.name}.parts"
        _check_parts(self.parts)
        self.parts.mkdir(exist_ok=True)
        self._part = self.parts / f"rank-{self.rank:05d}.parquet"
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self.rows = 0

    def add(self, prediction: Any, index: Any = None) -> None:
        """Append one batch of predictions (see `prediction_table`)."""
        table = prediction_table(prediction, index, self.keys)
        if self._writer is None:
            self._schema = table.schema
            self._writer = pq.ParquetWriter(self._part, self._schema)
        elif table.schema != self._schema:
            try:
                table = table.select(self._schema.names).cast(self._schema)
            except (KeyError, ValueError, pa.ArrowInvalid) as err:
                raise ValueError(f"a batch's columns {table.schema} differ from the first batch's {self._schema}") from err
        self._writer.write_table(table)  # one row group per batch: the merge interleaves them
        self.rows += table.num_rows

    def close(self) -> Path:
        """Finish this rank's part, then rank 0 merges every rank's into the output (all ranks call this)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        elif self._part.exists():
            self._part.unlink()  # a stale part of an earlier run: this rank wrote nothing
        self._barrier()
        error = None
        if self.rank == 0:
            try:
                self._merge()
            except BaseException as err:  # reported to every rank below, then raised here
                error = err
        status = self._broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if status is not None:
            raise RuntimeError(f"rank 0 could not write {self.path}: {status}")
        return self.path

    def abort(self) -> None:
        """Drop this rank's part (after a failed predict)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._part.unlink(missing_ok=True)
        try:
            self.parts.rmdir()  # only when no other rank's part is left in it
        except OSError:
            pass

    # ------------------------------------------------------------------ rank 0
    def _part_files(self) -> list[pq.ParquetFile]:
        files = []
        for r in range(self.world_size):
            part = self.parts / f"rank-{r:05d}.parquet"
            if part.exists():
                files.append(pq.ParquetFile(part))
        if not files:
            raise ValueError("no rank wrote any prediction: nothing to write")
        return files

    def _merge(self) -> None:
        try:
            files = self._part_files()
            schema = files[0].schema_arrow
            names = schema.names
            key_cols = [c for c in KEY_COLUMNS if c in names]
            if not {"experiment", "fov_name", "track_id", "t"} <= set(key_cols):
                raise ValueError(f"the index lacks the key columns {sorted({'experiment', 'fov_name', 'track_id', 't'} - set(key_cols))}: "
                                 "one row per observation cannot be checked")
            # round-robin by row group (batch): rank 0 step 0, rank 1 step 0, ..., rank 0 step 1, ...
            order = [(f, g) for g in range(max(pf.num_row_groups for pf in files))
                     for f in range(len(files)) if g < files[f].num_row_groups]
            keys = pd.concat(
                [files[f].read_row_group(g, columns=key_cols).to_pandas() for f, g in order], ignore_index=True
            )
            keep = ~keys.duplicated(keep="first").to_numpy()
            self._check_target_again()
            if self.format == "parquet":
                self._write_parquet(files, order, keep, schema)
            else:
                self._write_anndata(files, order, keep, schema)
        finally:
            shutil.rmtree(self.parts, ignore_errors=True)

    def _check_target_again(self) -> None:
        if os.path.lexists(self.path) and not self.overwrite:
            raise FileExistsError(f"{self.path} appeared while predicting; pass overwrite=True to replace it")
        check_target(self.path, self.overwrite, _kind(self.path, self.format))

    def _tables(self, files, order, keep, schema):
        start = 0
        for f, g in order:
            table = files[f].read_row_group(g)
            n = table.num_rows
            mask = keep[start:start + n]
            start += n
            if table.schema != schema:  # another rank's part: the same columns, perhaps other inferred types
                table = table.select(schema.names).cast(schema)
            yield table if mask.all() else table.filter(pa.array(mask))

    def _write_parquet(self, files, order, keep, schema) -> None:
        with atomic_output(self.path, self.overwrite, kind=PARQUET) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            pending, rows = [], 0
            for table in self._tables(files, order, keep, schema):
                pending.append(table)
                rows += table.num_rows
                if rows >= 65536:
                    writer.write_table(pa.concat_tables(pending))
                    pending, rows = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending))

    def _write_anndata(self, files, order, keep, schema) -> None:
        try:
            import anndata
        except ImportError as err:
            raise ImportError("AnnData output needs anndata: pip install 'dynaclr-dali[anndata]' "
                              "(or write .parquet)") from err
        table = pa.concat_tables(list(self._tables(files, order, keep, schema)))
        obs, arrays = _split_table(table)
        if self.embedding_key not in arrays:
            raise KeyError(f"embedding_key {self.embedding_key!r} is not among the predictions' arrays {list(arrays)}")
        obs.index = obs.index.astype(str)
        adata = anndata.AnnData(X=arrays[self.embedding_key], obs=obs)
        for k, a in arrays.items():
            if k != self.embedding_key:
                adata.obsm[f"X_{k}"] = a
        with atomic_output(self.path, self.overwrite, kind=_kind(self.path, self.format)) as tmp:
            if self.path.suffix.lower() == ".h5ad":
                adata.write_h5ad(tmp)
            else:
                adata.write_zarr(tmp)
                write_marker(tmp, "embeddings")  # a marked folder: a later overwrite may replace it


def _split_table(table: pa.Table) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    obs, arrays = {}, {}
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
            flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
            arrays[name] = flat.reshape(-1, width)
        else:
            obs[name] = column.to_numpy(zero_copy_only=False)
    return pd.DataFrame(obs), arrays


def read_embeddings(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """A parquet written here: (index columns as a DataFrame, {embedding name: (N, D) array})."""
    return _split_table(pq.read_table(path))


def write_embeddings(
    predictions: Iterable[Any],
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    overwrite: bool = False,
    embedding_key: str = "features",
    keys: Sequence[str] | None = None,
) -> Path:
    """Write predictions (e.g. `trainer.predict(...)`'s list, or any iterable of predict_step outputs).

    Under torch.distributed every rank calls it with its own predictions; rank 0 writes the one
    output (no duplicate observations) and every rank returns its path.
    """
    table = EmbeddingTable(path, format=format, overwrite=overwrite, embedding_key=embedding_key, keys=keys)
    try:
        for prediction in predictions:
            # trainer.predict with several dataloaders returns one list per dataloader
            for p in (prediction if isinstance(prediction, list) else [prediction]):
                table.add(p)
    except BaseException:
        table.abort()
        raise
    return table.close()


def _writer_class() -> type:
    from lightning.pytorch.callbacks import BasePredictionWriter as _Base

    class EmbeddingWriter(_Base):
        """Lightning prediction writer: one table (parquet or AnnData) of every rank's predictions.

        Writes each batch as it comes (use `trainer.predict(..., return_predictions=False)` so that
        nothing accumulates in memory) and the output at the end of the predict epoch. A prediction
        without `index` is joined with the batch's `index`.
        """

        def __init__(self, output_path: str | os.PathLike[str], *, format: str | None = None,
                     overwrite: bool = False, embedding_key: str = "features",
                     keys: Sequence[str] | None = None) -> None:
            super().__init__(write_interval="batch")
            self.output_path = Path(output_path)
            self.format = output_format(self.output_path, format)
            self.overwrite = overwrite
            self.embedding_key = embedding_key
            self.keys = keys
            self._table: EmbeddingTable | None = None
            self.written: Path | None = None

        def setup(self, trainer, pl_module, stage: str) -> None:
            super().setup(trainer, pl_module, stage)
            if stage == "predict":
                _check_target(self.output_path.absolute(), self.format, self.overwrite)

        def on_predict_epoch_start(self, trainer, pl_module) -> None:
            strategy = trainer.strategy
            self._table = EmbeddingTable(
                self.output_path, format=self.format, overwrite=self.overwrite, embedding_key=self.embedding_key,
                keys=self.keys, rank=trainer.global_rank, world_size=trainer.world_size,
                barrier=lambda: strategy.barrier("embedding_writer"), broadcast=lambda obj: strategy.broadcast(obj, src=0),
            )

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                               dataloader_idx) -> None:
            assert self._table is not None
            index = None
            if not (isinstance(prediction, Mapping) and "index" in prediction):
                if not (isinstance(batch, Mapping) and "index" in batch):
                    raise ValueError("neither the prediction nor the batch has an 'index'")
                index = batch["index"]
            self._table.add(prediction, index)

        def on_predict_epoch_end(self, trainer, pl_module) -> None:
            if self._table is not None:
                table, self._table = self._table, None
                self.written = table.close()

        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            if self._table is not None:
                self._table.abort()
                self._table = None

    EmbeddingWriter.__qualname__ = "EmbeddingWriter"  # pickles by name, through the module's __getattr__
    return EmbeddingWriter


_WRITER: type | None = None


def __getattr__(name: str) -> Any:
    """`EmbeddingWriter`, the Lightning callback, is built on first access (Lightning loads only then)."""
    global _WRITER
    if name != "EmbeddingWriter":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _WRITER is None:
        try:
            _WRITER = _writer_class()
        except ImportError as err:
            raise ImportError("EmbeddingWriter is a Lightning callback: pip install 'dynaclr-dali[lightning]' "
                              "(write_embeddings works without it)") from err
    return _WRITER
