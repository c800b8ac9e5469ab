"""The HDF5 store: the only code in pyengine that opens .h5 files.

Modules: ``_h5`` (format, opening, meta, write failures), ``writer`` (captures),
``reader`` (``StoreReader``), ``results`` (results files).

Layout (schema 1)::

    /meta                       attrs: format, schema_version, pyengine_version, model_class,
                                model_param_hash, dataset_name, dataset_size, created, config
    /inputs/index, /inputs/labels     (N,)
    /concepts/<name>            (N,) int codes; attr ``categories`` (JSON list)
    /activations/<module.path>  (N, ...) chunked ~1 MiB, lzf or gzip, float16 or float32
    /results                    external link -> X.h5.d/index.h5:/results (relative paths)
    /results/<technique>/<run>  (in the index) external link -> <technique>/<run>.h5:/result,
                                the run's datasets + attrs (``options`` as JSON)

Results live next to the file, one file per run in ``X.h5.d/`` (see ``results``): adding a run
writes the run and a small index, never copies the file. The links are relative and resolved
from the linking file's folder, so ``X.h5`` and ``X.h5.d`` move together; h5py and C readers see
``/results/<technique>/<run>`` as one tree. Files from older versions (runs inline) still read,
and move their runs out on the first write.

``StoreReader`` reads each layer through a chunk cache sized for random-row reads
(``CHUNK_CACHE_BYTES`` split among the layers, at least a few chunks each; HDF5's default of
1 MiB, 8 MiB from 2.0, re-decompresses a chunk for every row read at random).

Every dataset chunk carries a fletcher32 checksum (HDF5's built-in filter): a damaged chunk
fails its read, and every read error is a one-line StoreError naming the file and dataset.

Captures write ``X.h5.partial`` in SWMR mode, flushed after every batch, and rename it to
``X.h5`` when complete; a killed capture resumes from the last flushed batch. One capture
writes a store at a time (``pyengine._lock``); ``StoreReader(partial, running_ok=True)``
reads a running capture's rows so far.

Write errors (a full disk, EIO, a quota, a file removed underneath) are StoreErrors naming
the file and the cause. Nothing gets its final name unless every write and flush succeeded,
the file closed cleanly and it re-opens with the rows and layers it should hold; a file
whose write failed is removed, as it cannot be trusted (see ``discard``).
"""

from pyengine.store._h5 import (
    CHUNK_BYTES,
    COMPRESSIONS,
    FORMAT,
    LIBVER,
    SCHEMA_VERSION,
    STORED_DTYPES,
    chunk_rows,
    partial_path,
)
from pyengine.store.reader import CHUNK_CACHE_BYTES, StoreReader
from pyengine.store.results import PendingResult, reserve_run_name, results_folder, write_results
from pyengine.store.writer import ActivationWriter

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_CACHE_BYTES",
    "COMPRESSIONS",
    "FORMAT",
    "LIBVER",
    "SCHEMA_VERSION",
    "STORED_DTYPES",
    "ActivationWriter",
    "PendingResult",
    "StoreReader",
    "chunk_rows",
    "partial_path",
    "reserve_run_name",
    "results_folder",
    "write_results",
]
