"""Stacks larger than memory: exact chunked reconstruction and segmentation on dask arrays.

:func:`reconstruct` gives the instances :func:`cp3d.reconstruct` gives on the
whole volume, for any chunking: the same voxels in the same instances,
numbered the same way (1..N in C order of each instance's first voxel). Each
stage calls the in-memory stage functions on one chunk and the halo that
stage needs:

0. copy: the flows go chunk by chunk into files of the temporary folder,
   each chunk's file and its face slabs, from which the follow and the flow
   filter read a chunk and its halo;
1. follow: each chunk's foreground voxels move through the chunk and a halo
   of the flows, in whole-volume coordinates so that every step rounds as it
   does on the whole volume; a trajectory that leaves the halo is flagged and
   recomputed with a halo twice as wide, until none leaves;
2. group: the end voxels that land within a chunk and twice the closing
   ball's extent are marked, closed and labelled (:func:`cp3d.close_and_label`);
   the chunk's part of the closing is exact;
3. merge: groups that touch across a chunk face are one group (face pairs,
   a sparse graph, its connected components: the way
   ``dask_image.ndmeasure.label`` merges);
4. each voxel takes the group at its end voxel (a halo of the largest
   distance any voxel moved);
5. filter: per-instance sums per chunk (voxels, coordinates, flow error),
   added up over the volume, then :func:`cp3d.filters.keep_instances`, the
   verdict of the in-memory filters.

The returned labels are lazy: nothing runs until they are computed. The
global steps between the stages need the earlier stages' results, so one
task of the labels' graph, the plan, runs stages 0-5 as stage-wide batches
of tasks on the scheduler that computes the labels (from a
``dask.distributed`` worker through its ``worker_client``, so that every
worker takes part), keeping the intermediate volumes (a copy of the flows,
end voxels, groups, instances) as chunk files in a temporary folder on disk;
the labels' blocks then read the stored instances through the plan's
renumbering table. The table is saved beside them, so a second
computation only reads. A worker that dies is replaced and its tasks rerun
by dask: every task writes whole chunks, so a rerun writes the same bytes.
This module needs the ``dask`` extra (``pip install 'cp3d[dask]'``).
"""

import inspect
import itertools
import math
import os
import shutil
import tempfile
import warnings
import weakref

import numba
import numpy as np

from ._backend import CENTRAL_CROP, as_int_triple, as_triple, central_box, check_flows, check_foreground, check_scalar
from .filters import check_thresholds, keep_instances, sphere_volume, tanh_statistic_sums
from .follow import check_step, follow_in_window, smooth_flows
from .group import ball_offsets, close_and_label, mark_end_voxels, merge_table, relabel_by_first_voxel
from .reconstruct import reconstruction_parameters, warn_all_filtered, warn_on_flow_convention
from .targets import heat_flows

__all__ = ["local_cluster", "reconstruct", "segment", "segment_central_crop"]

# The flows' scale and sign are checked at the call on at most this much of the middle chunk.
_SAMPLE_SHAPE = (64, 128, 128)

# End index of a voxel whose trajectory left its window (background is -1).
_ESCAPED = -2


def _import_dask():
    try:
        import dask
        import dask.array
        import zarr  # noqa: F401 (the predicted maps' store)
    except ImportError as e:
        raise ImportError(f"cp3d.dask needs dask and zarr ({e}); pip install 'cp3d[dask]'") from e
    return dask


def local_cluster(n_workers=1, *, memory_limit="auto", **kwargs):
    """A ``dask.distributed.LocalCluster`` on this machine, set up for cp3d's chunked runs.

    Each worker runs one task at a time and parallelises inside it: torch,
    BLAS and Numba get this machine's cores / `n_workers` threads (dask
    starts workers with ``OMP_NUM_THREADS=1``, made for one single-threaded
    task per core, which would leave each task on one core). Workers keep
    glibc's allocator defaults: dask sets ``MALLOC_TRIM_THRESHOLD_``, which
    hands freed memory back to the system at once, so that every large array
    of the next task is mapped and faulted in anew (the chunked
    reconstruction of 1e8 voxels on 2 workers: 13% less time, a third less
    system time without it).

    Parameters
    ----------
    n_workers : int
        Worker processes (one task at a time each).
    memory_limit : str or int
        Memory per worker, as in ``LocalCluster``.
    **kwargs
        Passed to ``LocalCluster``.

    Returns
    -------
    distributed.LocalCluster
        Started; close it (or use it as a context manager) when done.

    Examples
    --------
    >>> from distributed import Client
    >>> import cp3d.dask
    >>> with cp3d.dask.local_cluster(2) as cluster, Client(cluster):  # doctest: +SKIP
    ...     labels = cp3d.dask.reconstruct(flows, foreground).compute()
    """
    dask = _import_dask()
    try:
        from distributed import LocalCluster
    except ImportError as e:
        raise ImportError(f"a local cluster needs dask.distributed ({e}); pip install 'cp3d[dask]'") from e
    if not (isinstance(n_workers, (int, np.integer)) and n_workers >= 1):
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"),
                            str(max(1, cores // int(n_workers))))
    # Workers inherit this process's environment, and dask's setting for a variable yields to it: the variables
    # are set here while the workers start, then restored (the nannies also write their settings into it).
    saved = {name: os.environ.get(name) for name in [*threads, "MALLOC_TRIM_THRESHOLD_"]}
    os.environ.update(threads)
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):  # None: unset
            return LocalCluster(n_workers=int(n_workers), threads_per_worker=1, memory_limit=memory_limit,
                                dashboard_address=kwargs.pop("dashboard_address", None), **kwargs)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def reconstruct(flows, foreground, *, step=None, n_iter=None, closing_radius=None, diameter_range=None,
                min_overlap=0.2, max_flow_error=0.8, diameter=None, targets="tanh", tanh_scale=None,
                inward=False, sigma=0.0, min_border_volume=0.0, backend="auto", chunks=None, halo=None,
                temporary_directory=None, progress=False):
    """Reconstruct cell instances chunk by chunk, exactly as on the whole volume.

    Parameters
    ----------
    flows : dask.array.Array, shape (3, Z, Y, X)
        Gradient maps (z, y, x), floating point. A NumPy array is wrapped.
    foreground : dask.array.Array, shape (Z, Y, X)
        Bool mask or a probability map thresholded at 0.5.
    step, n_iter, closing_radius, diameter_range, min_overlap, max_flow_error, diameter, targets, tanh_scale, \
inward, sigma, min_border_volume
        As in :func:`cp3d.reconstruct`.
    backend : {"auto", "numba"}
        Implementation of each chunk's work (the CPU kernels).
    chunks : int or (int, int, int), optional
        Shape of the chunks the work is cut into; default the chunks of
        `foreground`. Any shape gives the same labels; larger chunks waste
        less on halos, smaller ones bound the memory of each task.
    halo : int or (int, int, int), optional
        Flows read around a chunk for following; default one cell diameter
        (10 voxels without `diameter`). Trajectories that leave it are
        recomputed with a wider halo, so it only changes the speed.
    temporary_directory : str or os.PathLike, optional
        Folder for the intermediate volumes; default dask's
        ``temporary-directory`` setting or the system's. At most about 28
        bytes per voxel: a copy of the flows with each chunk's face slabs
        (12-16 bytes, removed after the filters), end voxels and groups (4-8
        and 4, removed once labelled) and instances (4, kept for the labels'
        blocks). On a cluster of several machines it must be a folder every
        worker can reach. It is removed when the returned array is
        garbage-collected.
    progress : bool
        Show a progress bar over the chunks of each stage.

    Returns
    -------
    labels : dask.array.Array, shape (Z, Y, X), uint32
        Lazy instances 1..N, equal to
        ``cp3d.reconstruct(flows.compute(), foreground.compute(), ...)``.
        Computing them runs the reconstruction (see the module's
        docstring); warnings about the filters are raised then, where the
        plan runs (on a worker under ``dask.distributed``).

    Notes
    -----
    The equality is exact, voxel for voxel and id for id, but for the flow
    filter, whose per-instance error sums are added in another order than
    on the whole volume (a difference of about 1e-16 relative, which only
    matters for an instance whose error equals `max_flow_error` to that
    precision). Memory per task is about ``(c + 2 h)**3 * 12`` bytes of
    flows for chunks of ``c`` voxels and a halo ``h``, plus 8 bytes per
    voxel of a chunk grown by the distance voxels move and twice the closing
    radius; the volume only sets the size of the temporary folder. With heat
    targets and a flow filter, each instance's heat flows are recomputed from
    its bounding box, so a task also holds the boxes of the instances whose
    first voxel lies in its chunk. The in-memory warnings about the flows'
    scale and sign are given at the call, from the middle of the middle
    chunk.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> import cp3d, cp3d.dask
    >>> truth = np.zeros((16, 16, 32), np.uint32)
    >>> truth[2:14, 2:14, 2:15], truth[2:14, 2:14, 17:30] = 1, 2
    >>> flows = da.from_array(cp3d.tanh_flows(truth), chunks=(3, 8, 8, 8))
    >>> labels = cp3d.dask.reconstruct(flows, da.from_array(truth > 0, chunks=8))
    >>> bool((labels.compute() == cp3d.reconstruct(flows.compute(), truth > 0)).all())
    True
    """
    plan = _Plan(flows, foreground, step=step, n_iter=n_iter, closing_radius=closing_radius,
                 diameter_range=diameter_range, min_overlap=min_overlap, max_flow_error=max_flow_error,
                 diameter=diameter, targets=targets, tanh_scale=tanh_scale, inward=inward, sigma=sigma,
                 min_border_volume=min_border_volume, backend=backend, chunks=chunks, halo=halo,
                 temporary_directory=temporary_directory, progress=progress)
    # The in-memory checks of the flows' scale and sign, on the middle of the middle chunk: cheap, and at the call
    # (a crop of at most _SAMPLE_SHAPE voxels comes back to the client, not the whole chunk).
    middle = central_box(plan.grid.block(len(plan.grid) // 2), _SAMPLE_SHAPE)
    sample_flows, sample_foreground = plan.dask.compute(plan.flows[(slice(None),) + middle], plan.foreground[middle])
    warn_on_flow_convention(check_flows(np.asarray(sample_flows)),
                            check_foreground(np.asarray(sample_foreground), sample_foreground.shape), inward)
    return plan.labels()


class _Plan:
    """The validated settings of one chunked reconstruction, and the stages that carry it out.

    Calling the plan (as one task of the returned array's graph) runs the
    stages on the active scheduler and returns the table from stored group
    ids to final labels; it is saved in the temporary folder, so that a
    second computation of the labels only reads them.
    """

    def __init__(self, flows, foreground, *, step, n_iter, closing_radius, diameter_range, min_overlap,
                 max_flow_error, diameter, targets, tanh_scale, inward, sigma, min_border_volume, backend, chunks,
                 halo, temporary_directory, progress):
        self.dask = _import_dask()
        if backend not in ("auto", "numba"):
            raise ValueError(f"backend must be 'auto' or 'numba' for chunked reconstruction, got {backend!r}")
        flows, foreground = _check_inputs(flows, foreground)
        self.params = params = reconstruction_parameters(diameter, targets, tanh_scale)
        step, self.n_iter = check_step(params.step if step is None else step,
                                       params.n_iter if n_iter is None else n_iter)
        self.radius = params.closing_radius if closing_radius is None else closing_radius
        self.extent = np.abs(ball_offsets(self.radius)).max(axis=0)
        if diameter_range is not None and not 0 <= diameter_range[0] <= diameter_range[1]:
            raise ValueError(f"diameter_range must be (min, max) with 0 <= min <= max, got {diameter_range!r}")
        self.volume_range = (params.volume_range if diameter_range is None
                             else tuple(map(sphere_volume, diameter_range)))
        self.min_overlap, self.max_flow_error = check_thresholds(min_overlap, max_flow_error)
        self.min_border_volume = check_scalar(min_border_volume, "min_border_volume", 0)
        if not np.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a non-negative number, got {sigma!r}")
        self.grid = _Grid(foreground.shape, foreground.chunksize if chunks is None else chunks)
        if halo is None:
            halo = np.ceil(as_triple(10.0 if diameter is None else diameter, "diameter"))
        self.halo = np.maximum(1, np.asarray(as_triple(halo, "halo"), float)).astype(np.int64)
        _warn_on_small_chunks(self.grid, self.halo)
        self.flows = _smooth(flows, sigma) if sigma > 0 else flows
        self.foreground = foreground
        self.signed = -step if inward else step
        self.targets, self.inward, self.progress = targets, inward, progress
        self.scratch = _Scratch(temporary_directory)
        self.folder = self.scratch.path
        # Written by stage 4, read by the labels' blocks.
        self.instances = _ChunkFiles(self.folder, "instances", self.grid, np.uint32, 0, 0)

    def __getstate__(self):
        # Workers get the folder's path; the folder itself is removed by the client's copy alone.
        return {k: v for k, v in self.__dict__.items() if k not in ("dask", "scratch")}

    def __setstate__(self, state):
        self.__dict__.update(state, dask=_import_dask(), scratch=None)

    def labels(self, after=()):
        """The lazy labels: blocks of the stored instances renumbered by the plan's table.

        `after` are delayed objects the plan waits for (the prediction that
        writes the maps it reads).
        """
        da = self.dask.array
        lut = self.dask.delayed(self, pure=False)(*after)
        chunks = da.core.normalize_chunks(self.grid.chunks, self.grid.shape)
        return da.map_blocks(_Stored(self.instances, self.scratch, renumber=True),
                             after=lut, chunks=chunks, dtype=np.uint32, meta=np.empty((0, 0, 0), np.uint32))

    def __call__(self, *after):
        done = os.path.join(self.folder, "labels.npy")
        if os.path.exists(done):
            return np.load(done)
        lut = self.run(_Runner(self.dask, self.progress))
        _save_atomically(done, lut)
        return lut

    def run(self, run):
        """Stages 0-5 (see the module's docstring); the table from stored ids to final labels."""
        dask, grid, foreground = self.dask, self.grid, self.foreground
        # 0. the flows, copied chunk by chunk into the temporary folder. The follow reads each chunk with a halo
        # and the flow filter reads it again: from a compressed input, dask reads a window's piece of each
        # neighbouring chunk by decompressing that whole chunk (9-27 chunks per window); the copy serves a window
        # from its own chunk and thin slabs of the others (the reconstruction of 1e8 voxels from a Zarr store:
        # 61 -> 47 CPU seconds with a first, Zarr copy). Smoothing (sigma) runs once, here.
        flows = _ChunkFiles(self.folder, "flows", grid, np.float32, 0.0, self.halo, channels=3)
        run([dask.delayed(_copy_block, pure=False)(self.flows[(slice(None),) + grid.block(b)], flows, grid.block(b))
             for b in range(len(grid))], "copy flows")
        # End voxels as flat indices: half the bytes to write and read where the volume allows. The grouping reads
        # them around each chunk as far as voxels move (about the halo) and twice the ball's extent.
        ends = _ChunkFiles(self.folder, "ends", grid, np.int32 if math.prod(grid.shape) < 2**31 else np.int64, -1,
                           self.halo + 2 * self.extent)

        # 1. follow, widening the halo for the chunks whose trajectories escaped.
        reach = np.zeros(3, np.int64)
        halo, todo, redo = self.halo, list(range(len(grid))), False
        while todo:
            tasks = []
            for b in todo:
                window = grid.grow(grid.block(b), halo)
                tasks.append(dask.delayed(_follow_block, pure=False)(
                    flows, foreground[grid.block(b)], ends, grid.block(b), window, grid.shape, self.signed,
                    self.n_iter, redo))
            results = run(tasks, "follow" if not redo else f"follow (halo {tuple(halo.tolist())})")
            for escaped, moved in results:
                reach = np.maximum(reach, moved)
            todo = [b for b, (escaped, _) in zip(todo, results) if escaped]
            halo, redo = 2 * halo, True

        # 2. group, each chunk with the ends that can land within twice the ball's extent.
        groups = _ChunkFiles(self.folder, "groups", grid, np.uint32, 0, self.halo)
        counts = run([dask.delayed(_group_block, pure=False)(ends, groups, grid, b, reach, self.extent, self.radius)
                      for b in range(len(grid))], "group")
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        # 3. merge groups across chunk faces.
        pairs = run([dask.delayed(_face_pairs, pure=False)(groups, grid, b, offsets) for b in range(len(grid))],
                    "merge")
        merged = merge_table(pairs, int(offsets[-1]))
        merged_d = dask.delayed(merged, pure=True)
        offsets_d = dask.delayed(offsets, pure=True)

        # 4. each voxel takes the group at its end voxel; per-chunk sums.
        instances = self.instances
        need_box = self.targets == "heat" and np.isfinite(self.max_flow_error)
        n = int(merged.max()) if merged.size else 0
        blocks = run([dask.delayed(_instance_block, pure=False)(ends, groups, instances, grid, b, reach, offsets_d,
                                                                merged_d, n, need_box)
                      for b in range(len(grid))], "label")
        stats = _Statistics(blocks, n, need_box)
        for done in (ends, groups):  # read by no later stage: their disk space back now
            shutil.rmtree(done.path, ignore_errors=True)

        # 5. filter.
        flow_error = None
        if np.isfinite(self.max_flow_error) and stats.n:
            if self.targets == "tanh":
                error = _tanh_error(dask, run, flows, instances, grid, stats, self.params, self.inward, self.folder)
            else:
                error = _heat_error(dask, run, flows, instances, grid, stats, self.inward)
            flow_error = error / (3 * np.maximum(stats.volume, 1))
        overlap = stats.inside / np.maximum(stats.volume, 1)
        keep = keep_instances(stats.volume, overlap, flow_error, stats.on_border, self.volume_range,
                              self.min_overlap, self.max_flow_error, self.min_border_volume)
        if stats.n and not keep.any():
            warn_all_filtered(stats.n, self.volume_range, self.max_flow_error, self.targets, self.inward)
        # Kept instances numbered in C order of their first voxel, as on the whole volume.
        kept = np.flatnonzero(keep)
        lut = np.zeros(stats.n + 1, np.uint32)
        lut[kept[np.argsort(stats.first[kept])]] = np.arange(1, kept.size + 1, dtype=np.uint32)
        shutil.rmtree(flows.path, ignore_errors=True)  # the largest intermediate; no longer needed
        return lut


def _warn_on_small_chunks(grid, halo):
    """Chunks thinner than the follow halo give the same labels, but each task reads many times its chunk."""
    thin = [c < h and c < n for c, h, n in zip(grid.chunks, halo, grid.shape)]
    if any(thin):
        window = math.prod(min(c + 2 * h, n) for c, h, n in zip(grid.chunks, halo, grid.shape))
        warnings.warn(f"chunks {grid.chunks} are thinner than the follow halo {tuple(halo.tolist())}: the labels are "
                      f"exact, but each task reads up to {window / math.prod(grid.chunks):.0f}x its chunk's flows; "
                      f"chunks of at least {tuple(int(max(c, h)) for c, h in zip(grid.chunks, halo))} voxels waste "
                      "less", stacklevel=4)


def _save_atomically(path, array):
    """np.save under a temporary name, then renamed: a reader never sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


class _Stored:
    """Blocks read from an array of the temporary folder (Zarr, or chunk files) once the task `after` is done.

    `lead` indexes the axes before the block's own (a channel); with
    `renumber`, `after` is the plan's table and the block its stored ids
    through it. Holds the temporary folder (client side only), so that it
    lives as long as the array.
    """

    def __init__(self, store, scratch, lead=(), renumber=False):
        self.store, self.scratch, self.lead, self.renumber = store, scratch, lead, renumber

    def __call__(self, after=None, block_info=None):
        block = self.store[self.lead + tuple(slice(a, b) for a, b in block_info[None]["array-location"])]
        return after[block] if self.renumber else block

    def __reduce__(self):
        return _Stored, (self.store, None, self.lead, self.renumber)


def _check_inputs(flows, foreground):
    import dask.array as da

    if not isinstance(foreground, da.Array):
        foreground = np.asarray(foreground)
        foreground = da.from_array(foreground, chunks=foreground.shape)
    if not isinstance(flows, da.Array):
        flows = np.asarray(flows)
        flows = da.from_array(flows, chunks=(3,) + foreground.chunksize)
    if flows.ndim != 4 or flows.shape[0] != 3:
        raise ValueError(f"flows must have shape (3, Z, Y, X), got {tuple(flows.shape)}")
    if flows.dtype.kind != "f":
        raise TypeError(f"flows must be floating point, got {flows.dtype}")
    if foreground.ndim != 3 or foreground.shape != flows.shape[1:]:
        raise ValueError(f"foreground shape {tuple(foreground.shape)} does not match the flows' volume shape "
                         f"{tuple(flows.shape[1:])}")
    if any(math.isnan(n) for n in flows.shape + foreground.shape):
        raise ValueError("flows and foreground need known shapes (call compute_chunk_sizes() first)")
    if foreground.size == 0:
        raise ValueError(f"foreground is empty (shape {tuple(foreground.shape)})")
    return flows, foreground


def _smooth(flows, sigma):
    """smooth_flows chunk by chunk: a halo of the Gaussian's truncation radius makes it exact."""
    r = int(4.0 * sigma + 0.5)  # scipy.ndimage.gaussian_filter's radius (truncate=4)
    flows = flows.rechunk({0: 3})
    return flows.map_overlap(lambda f: smooth_flows(np.asarray(f, np.float32), sigma), depth=(0, r, r, r),
                             boundary="nearest", dtype=np.float32)


class _Grid:
    """A regular grid of chunks over a (Z, Y, X) volume."""

    def __init__(self, shape, chunks):
        chunks = np.broadcast_to(np.asarray(chunks), (3,))
        if not all(float(c).is_integer() and c >= 1 for c in chunks):
            raise ValueError(f"chunks must be positive integers (z, y, x), got {chunks.tolist()!r}")
        self.shape = tuple(int(n) for n in shape)
        self.chunks = tuple(int(min(c, n)) for c, n in zip(chunks, self.shape))
        self.counts = tuple(-(-n // c) for n, c in zip(self.shape, self.chunks))

    def __len__(self):
        return math.prod(self.counts)

    def index(self, b):
        return np.unravel_index(b, self.counts)

    def block(self, b):
        return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(self.index(b), self.chunks, self.shape))

    def grow(self, box, by):
        """`box` (slices) grown by `by` voxels per axis, clipped to the volume."""
        by = np.broadcast_to(by, (3,))
        return tuple(slice(max(0, s.start - int(d)), min(n, s.stop + int(d))) for s, d, n in zip(box, by, self.shape))

    def overlapping(self, box):
        """Indices of the chunks that overlap `box`."""
        ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(box, self.chunks)]
        return [int(np.ravel_multi_index(i, self.counts)) for i in itertools.product(*ranges)]


class _Scratch:
    """A temporary folder of Zarr arrays, removed with the object that owns it."""

    def __init__(self, folder):
        import dask

        folder = folder or dask.config.get("temporary-directory", None) or tempfile.gettempdir()
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"temporary_directory does not exist: {folder!r}")
        self.path = tempfile.mkdtemp(prefix="cp3d-dask-", dir=folder)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)


class _ChunkFiles:
    """A volume in a folder of ``.npy`` files: one per chunk, and the chunk's six face slabs `thickness` thick.

    Indexed like a Zarr array (``files[box]``, with a leading ``slice(None)``
    for `channels`); a chunk is written whole (``files[block] = array``,
    under a temporary name, then renamed), once per stage by one task. A read
    takes from each chunk that overlaps the box a face slab holding the part
    it needs (the thin pieces of the neighbours in a chunk's window), else the
    chunk's file; a chunk never written reads as `fill`. A chunk and a halo
    as thick as the slabs reads about 1.3x the chunk's bytes (128x256x256
    chunks, halo 10): Zarr reads whole stored chunks (3.4x with parts a
    quarter of the chunk), and its reads and writes of uncompressed parts took
    3-8x as long as ``np.load`` / ``np.save`` of whole files.
    """

    def __init__(self, folder, name, grid, dtype, fill, thickness, channels=None):
        self.path = os.path.join(folder, name)  # made by the first write
        self.grid, self.dtype, self.fill = grid, np.dtype(dtype), fill
        self.lead = () if channels is None else (channels,)
        self.thickness = tuple(int(min(t, c)) for t, c in zip(np.broadcast_to(thickness, (3,)), grid.chunks))

    def __setitem__(self, block, value):
        b = int(np.ravel_multi_index([s.start // c for s, c in zip(block, self.grid.chunks)], self.grid.counts))
        value = np.ascontiguousarray(value, self.dtype)
        os.makedirs(self.path, exist_ok=True)
        name = os.path.join(self.path, str(b))
        for axis, t in enumerate(self.thickness):
            if t == 0:
                continue
            lead = (slice(None),) * (len(self.lead) + axis)
            n = value.shape[len(self.lead) + axis]
            # Contiguous copies: np.save writes a strided view in many small writes.
            _save_atomically(f"{name}.{axis}lo.npy", np.ascontiguousarray(value[lead + (slice(0, t),)]))
            _save_atomically(f"{name}.{axis}hi.npy", np.ascontiguousarray(value[lead + (slice(n - t, n),)]))
        _save_atomically(f"{name}.npy", value)

    def __getitem__(self, key):
        box = key[len(self.lead):]
        lead = (slice(None),) * len(self.lead)
        chunks = self.grid.overlapping(box)
        if len(chunks) == 1 and tuple(box) == self.grid.block(chunks[0]):  # a whole chunk: its file as it is
            name = os.path.join(self.path, f"{chunks[0]}.npy")
            if os.path.exists(name):
                return np.load(name)
        out = np.full(self.lead + tuple(s.stop - s.start for s in box), self.fill, self.dtype)
        for c in chunks:
            block = self.grid.block(c)
            part = [slice(max(s.start, k.start), min(s.stop, k.stop)) for s, k in zip(box, block)]
            into = lead + tuple(slice(p.start - s.start, p.stop - s.start) for p, s in zip(part, box))
            piece = self._read(c, [slice(p.start - k.start, p.stop - k.start) for p, k in zip(part, block)],
                               [k.stop - k.start for k in block])
            if piece is not None:
                out[into] = piece
        return out

    def _read(self, c, local, size):
        # Whole files read (np.load), not memory-mapped: pages of files written moments ago map slowly.
        name = os.path.join(self.path, str(c))
        lead = (slice(None),) * len(self.lead)
        for axis, t in enumerate(self.thickness):
            s = local[axis]
            if 0 < t < size[axis] and (s.stop <= t or s.start >= size[axis] - t):
                side, shift = ("lo", 0) if s.stop <= t else ("hi", size[axis] - t)
                local[axis] = slice(s.start - shift, s.stop - shift)
                name = f"{name}.{axis}{side}"
                break
        if not os.path.exists(f"{name}.npy"):
            return None
        return np.load(f"{name}.npy")[lead + tuple(local)]


class _Runner:
    """Compute a list of delayed tasks on the active scheduler, with an optional progress bar."""

    def __init__(self, dask, progress):
        self.dask = dask
        self.progress = progress

    def __call__(self, tasks, desc):
        if not tasks:
            return []
        try:
            from distributed import get_worker, worker_client

            get_worker()
        except (ImportError, ValueError):
            # A local scheduler: a nested compute runs on a pool of its own.
            if not self.progress:
                return list(self.dask.compute(*tasks))
            from dask.diagnostics import ProgressBar

            with ProgressBar():
                return list(self.dask.compute(*tasks))
        from distributed import as_completed
        from tqdm.auto import tqdm

        # The plan runs as a task on a worker: the client it gets there leaves the worker's thread pool while it
        # waits, so the stage's tasks can run on every worker, this one included.
        with worker_client() as client:
            futures = client.compute(tasks)
            with tqdm(total=len(futures), desc=desc, unit="chunk", disable=not self.progress) as bar:
                for _ in as_completed(futures):
                    bar.update()
            return client.gather(futures)


def _copy_block(flows, store, block):
    """Store one chunk of the flows, validated, as float32."""
    store[block] = check_flows(np.asarray(flows))


def _follow_block(flows, foreground, ends, block, window, shape, step, n_iter, redo):
    """Follow one chunk's voxels through `window` of the stored `flows`; store their end voxels' flat indices.

    Returns the number of escaped trajectories and the largest distance
    (per axis, in voxels) from a voxel to its end voxel.
    """
    if redo:
        stored = ends[block]
        todo = stored == _ESCAPED
    else:
        todo = check_foreground(np.asarray(foreground), foreground.shape)
        stored = np.full(todo.shape, -1, ends.dtype)
    starts = np.flatnonzero(todo)
    if starts.size == 0:
        if not redo:
            ends[block] = stored
        return 0, np.zeros(3, np.int64)
    end, moved = follow_in_window(flows[(slice(None),) + window], [s.start for s in window], shape, block, starts,
                                  step, n_iter)
    escaped = end < 0
    end[escaped] = _ESCAPED
    stored.reshape(-1)[starts] = end
    ends[block] = stored
    return int(escaped.sum()), moved


def _group_block(ends, groups, grid, b, reach, extent, radius):
    """Close and label the end voxels around chunk `b`; store the chunk's groups 1..n; return n."""
    block = grid.block(b)
    box = grid.grow(block, 2 * extent)  # the closing of `block` depends on marks within 2 extents
    source = grid.grow(box, reach)  # voxels whose end voxel can lie in `box`
    mask = mark_end_voxels(ends[source], grid.shape, box)
    if not mask.any():
        return 0
    labels = close_and_label(mask, radius)
    own = labels[tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(block, box))]
    own = relabel_by_first_voxel(np.ascontiguousarray(own))
    groups[block] = own
    return int(own.max())


def _read_groups(groups, grid, box, offsets):
    """Groups in `box` as volume-wide ids (each chunk's ids shifted by its offset), int64."""
    out = groups[box].astype(np.int64)
    for c in grid.overlapping(box):
        part = tuple(slice(max(s.start, k.start) - s.start, min(s.stop, k.stop) - s.start)
                     for s, k in zip(box, grid.block(c)))
        view = out[part]
        view[view > 0] += offsets[c]
    return out


def _face_pairs(groups, grid, b, offsets):
    """Pairs of volume-wide group ids that touch across the far faces of chunk `b`."""
    block = grid.block(b)
    pairs = [np.zeros((0, 2), np.int64)]
    for axis in range(3):
        face = block[axis].stop
        if face >= grid.shape[axis]:
            continue
        box = tuple(slice(face - 1, face + 1) if a == axis else s for a, s in zip(range(3), block))
        both = _read_groups(groups, grid, box, offsets)
        lo, hi = np.take(both, 0, axis=axis).ravel(), np.take(both, 1, axis=axis).ravel()
        touch = (lo > 0) & (hi > 0)
        pairs.append(np.stack([lo[touch], hi[touch]], axis=1))
    return np.unique(np.concatenate(pairs), axis=0)


def _instance_block(ends, groups, instances, grid, b, reach, offsets, merged, n, need_box):
    """Give chunk `b`'s voxels the merged group at their end voxel; store; return per-instance sums."""
    block = grid.block(b)
    index = ends[block]
    region = grid.grow(block, reach)
    ids = np.empty(index.shape, np.uint32)
    _ids_at_end_kernel(index.reshape(-1), groups[region], np.array([s.start for s in region]),
                       np.array(grid.shape), np.array(grid.chunks), np.array(grid.counts), offsets, merged,
                       ids.reshape(-1))
    instances[block] = ids
    return _block_sums(ids, index >= 0, block, grid.shape, need_box, n)


# One pass over the chunk in Numba for the labels and the sums below: the NumPy expressions (unravelling the end
# voxels, a grown region of group ids as int64, a bincount per sum) took about 7x longer (the label stage's tasks
# at 1e8 voxels: 9.8 -> 3.4 CPU-s, reads and writes included).
@numba.njit(cache=True, nogil=True)
def _ids_at_end_kernel(index, groups, region_first, shape, chunks, counts, offsets, merged, ids):
    """ids[v] = merged group at voxel v's end voxel: its chunk's group id shifted by that chunk's offset."""
    for v in range(index.size):
        e = index[v]
        if e < 0:  # background
            ids[v] = 0
            continue
        z, y, x = e // (shape[1] * shape[2]), (e // shape[2]) % shape[1], e % shape[2]
        g = np.int64(groups[z - region_first[0], y - region_first[1], x - region_first[2]])
        if g > 0:
            g += offsets[((z // chunks[0]) * counts[1] + y // chunks[1]) * counts[2] + x // chunks[2]]
        ids[v] = merged[g]


def _block_sums(ids, fg, block, shape, need_box, n):
    """Per-instance sums over one chunk: voxels, foreground voxels, coordinates, first voxel, border, box."""
    first = np.array([s.start for s in block])
    volume = np.zeros(n + 1, np.int64)
    inside = np.zeros(n + 1, np.int64)
    coords = np.zeros((n + 1, 3), np.int64)
    first_voxel = np.full(n + 1, -1, np.int64)
    lo = np.full((n + 1 if need_box else 0, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.full((n + 1 if need_box else 0, 3), -1, np.int64)
    _sums_kernel(ids, fg, first, np.array(shape), need_box, volume, inside, coords, first_voxel, lo, hi)
    present = np.flatnonzero(volume)
    present = present[present > 0]
    # Coordinate sums are integers, held exactly in float64 as in cp3d.targets.numba_centroids.
    sums = {"ids": present, "volume": volume[present], "inside": inside[present].astype(np.float64),
            "coords": coords[present].astype(np.float64), "first": first_voxel[present]}
    faces = [np.take(ids, 0, axis=axis) for axis in range(3) if block[axis].start == 0]
    faces += [np.take(ids, -1, axis=axis) for axis in range(3) if block[axis].stop == shape[axis]]
    border = np.unique(np.concatenate([f.ravel() for f in faces])) if faces else np.zeros(0, np.uint32)
    sums["border"] = border[border != 0].astype(np.int64)
    if need_box:
        sums["lo"], sums["hi"] = lo[present], hi[present]
    return sums


@numba.njit(cache=True, nogil=True)
def _sums_kernel(ids, fg, first, shape, need_box, volume, inside, coords, first_voxel, lo, hi):
    nz, ny, nx = ids.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                i = ids[z, y, x]
                if i == 0:
                    continue
                c0, c1, c2 = z + first[0], y + first[1], x + first[2]
                volume[i] += 1
                inside[i] += fg[z, y, x]
                coords[i, 0] += c0
                coords[i, 1] += c1
                coords[i, 2] += c2
                if first_voxel[i] < 0:  # C order within a chunk is C order within the volume
                    first_voxel[i] = (c0 * shape[1] + c1) * shape[2] + c2
                if need_box:
                    lo[i, 0], lo[i, 1], lo[i, 2] = min(lo[i, 0], c0), min(lo[i, 1], c1), min(lo[i, 2], c2)
                    hi[i, 0], hi[i, 1], hi[i, 2] = max(hi[i, 0], c0), max(hi[i, 1], c1), max(hi[i, 2], c2)


class _Statistics:
    """Per-chunk sums added up over the volume (entry 0 is background)."""

    def __init__(self, blocks, n, need_box):
        self.n = n
        self.volume = np.zeros(n + 1, np.int64)
        self.inside = np.zeros(n + 1)
        self.coords = np.zeros((n + 1, 3))
        self.first = np.full(n + 1, np.iinfo(np.int64).max, np.int64)
        border = [np.zeros(0, np.int64)]
        if need_box:
            self.lo = np.full((n + 1, 3), np.iinfo(np.int64).max, np.int64)
            self.hi = np.full((n + 1, 3), -1, np.int64)
        for s in blocks:
            ids = s["ids"]
            self.volume[ids] += s["volume"]
            self.inside[ids] += s["inside"]
            self.coords[ids] += s["coords"]
            self.first[ids] = np.minimum(self.first[ids], s["first"])
            border.append(s["border"])
            if need_box:
                self.lo[ids] = np.minimum(self.lo[ids], s["lo"])
                self.hi[ids] = np.maximum(self.hi[ids], s["hi"])
        self.on_border = np.unique(np.concatenate(border))

    def centroids(self):
        # As cp3d.targets.numba_centroids divides its (exact) sums.
        return self.coords / np.maximum(self.volume.astype(np.float64), 1.0)[:, None]


def _tanh_error(dask, run, flows, instances, grid, stats, params, inward, folder):
    """Summed absolute tanh flow error per instance, with the centroids of the whole instances.

    The centroids go to the tasks through the temporary folder, not the task
    graph (24 bytes per instance: 24 MB for a million cells).
    """
    centroids = os.path.join(folder, "centroids.npy")
    _save_atomically(centroids, stats.centroids())
    tasks = [dask.delayed(_tanh_error_block, pure=False)(instances, flows, grid.block(b), centroids,
                                                         params.tanh_scale, inward)
             for b in range(len(grid))]
    error = np.zeros(stats.n + 1)
    for ids, part in run(tasks, "flow error"):
        error[ids] += part
    return error


def _tanh_error_block(instances, flows, block, centroids, scale, inward):
    """The chunk's instances and their summed flow errors over the chunk (`flows` the stored copy)."""
    labels = instances[block]
    ids = np.flatnonzero(np.bincount(labels.ravel()))
    ids = ids[ids > 0]
    # Ids renumbered 1..k through a table (a gather: 6x faster than searchsorted over the chunk).
    compact_of = np.zeros(int(ids[-1]) + 1 if ids.size else 1, np.uint32)
    compact_of[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)
    compact = compact_of[labels]
    table = np.concatenate([np.zeros((1, 3)), np.load(centroids, mmap_mode="r")[ids]])
    # The error sums do not depend on the foreground mask (only the unused inside counts do).
    _, _, error = tanh_statistic_sums(compact, flows[(slice(None),) + block], labels > 0, table, scale, inward,
                                      origin=[s.start for s in block])
    return ids, error[1:]


def _heat_error(dask, run, flows, instances, grid, stats, inward):
    """Summed absolute heat flow error per instance.

    Heat flows are recomputed per instance from the whole instance: each
    chunk handles the instances whose first voxel it holds, reading the
    bounding box of them all, with the diffusion length of the whole volume
    (twice the largest extent of any instance, as :func:`cp3d.heat_flows`).
    """
    present = np.flatnonzero(stats.volume > 0)  # a closed group may hold no end voxel, hence no voxel
    n_iter = 2 * int((stats.hi[present] - stats.lo[present] + 1).max())
    owner = np.ravel_multi_index(tuple(c // k for c, k in zip(np.unravel_index(stats.first[present], grid.shape),
                                                              grid.chunks)), grid.counts)
    tasks, owned = [], []
    for b in np.unique(owner):
        ids = present[owner == b]
        lo, hi = stats.lo[ids].min(axis=0), stats.hi[ids].max(axis=0) + 1
        box = tuple(slice(int(a), int(z)) for a, z in zip(lo, hi))
        tasks.append(dask.delayed(_heat_error_block, pure=False)(instances, flows, box, ids, n_iter, inward))
        owned.append(ids)
    error = np.zeros(stats.n + 1)
    for ids, part in zip(owned, run(tasks, "flow error")):
        error[ids] = part
    return error


def _heat_error_block(instances, flows, box, ids, n_iter, inward):
    labels = instances[box]
    labels = np.where(np.isin(labels, ids), labels, 0).astype(np.uint32)
    recomputed = heat_flows(labels, n_iter=n_iter)
    sign = np.float32(-1.0 if inward else 1.0)
    # The expression and the C order of the sum are cp3d.filters.instance_statistics' own.
    abs_error = np.abs(flows[(slice(None),) + box] - sign * recomputed).sum(axis=0)
    return np.bincount(labels.ravel(), weights=abs_error.ravel(), minlength=int(ids.max()) + 1)[ids]


def segment(image, model=None, *, diameter=None, voxel_size=None, chunks=None, augment=False, context=None,
            device="auto", temporary_directory=None, progress=False, **kwargs):
    """Segment a stack chunk by chunk: prediction and reconstruction on dask arrays.

    The stack is normalised by the percentiles of the whole stack (computed
    once), rescaled so that its cells match the model's training size,
    predicted chunk by chunk with the network's receptive radius as context
    on each side, rescaled back, and reconstructed with :func:`reconstruct`.

    Parameters
    ----------
    image : dask.array.Array, shape (Z, Y, X)
        One-channel stack (a NumPy array is wrapped).
    model : UNet3D or str or path-like, optional
        As in :func:`cp3d.segment`. ``None`` or ``"auto"``: the bundled
        model :func:`cp3d.segment` chooses on the stack's central crop
        (:func:`segment_central_crop`).
    diameter, voxel_size
        As in :func:`cp3d.segment`, but a number: estimate ``"auto"`` on the
        central crop first (:func:`segment_central_crop`).
    chunks : int or (int, int, int), optional
        Chunk shape of the stored maps and of the reconstruction, on the
        image's grid; default the chunks of `image`. The network runs on
        the tiles :func:`cp3d.predict` would choose for the whole stack
        within its memory budget (:data:`cp3d.model.predict.TILE_ELEMENTS`),
        one task per tile, each predicting its core with `context` around it.
    augment : bool
        Test-time mirroring (see :func:`cp3d.predict`): four network passes.
        Off by default here, where stacks are large.
    context : int, optional
        Voxels of context around each prediction chunk; default the
        network's receptive radius (rounded up to ``2**depth``), which makes
        the chunked maps equal to a whole-stack prediction up to float
        rounding.
    device : str
        Torch device on the workers: ``"auto"`` (CUDA where the worker sees
        a GPU), ``"cpu"`` or ``"cuda"``.
    temporary_directory : str or os.PathLike, optional
        Folder for the predicted maps and the reconstruction's intermediate
        store (see :func:`reconstruct`).
    progress : bool
        Progress bars over the chunks.
    **kwargs
        Passed to :func:`reconstruct` (e.g. ``max_flow_error``, ``halo``).

    Returns
    -------
    cp3d.Segmentation
        ``labels`` (lazy uint32), ``flows`` and ``foreground`` (lazy float32,
        read from the temporary store once predicted), ``seconds`` empty
        (nothing has run yet), the ``diameter`` and the ``model`` used. The
        network runs once, when the first of them is computed; later
        computations read its stored maps.

    Notes
    -----
    The percentiles are exact for stacks up to 8e6 voxels; larger stacks
    estimate them from a strided subsample of about 4e6 voxels (as
    :func:`cp3d.predict` does). With ``augment=False`` the maps equal
    :func:`cp3d.predict` on the whole stack up to float rounding; with
    mirroring they do too where each axis of the rescaled stack is a
    multiple of ``2**depth`` (elsewhere the mirrored passes see the pooling
    grid shifted, a small difference).

    Examples
    --------
    >>> import dask.array as da
    >>> import cp3d, cp3d.dask
    >>> image, _ = cp3d.data.synthetic_stack((32, 64, 64), 10, seed=1)
    >>> result = cp3d.dask.segment(da.from_array(image, chunks=32))  # doctest: +SKIP
    """
    dask = _import_dask()
    da = dask.array

    from .model import DEFAULT_MODEL, UNet3D, load_model
    from .segment import Segmentation, cell_extent, model_border_volume, model_tanh_scale

    if not isinstance(image, da.Array):
        image = np.asarray(image)
        image = da.from_array(image, chunks=image.shape)
    if image.ndim != 3:
        raise ValueError(f"image must be a 3D stack (Z, Y, X), got shape {tuple(image.shape)}")
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image must be real-valued, got dtype {image.dtype}")
    if isinstance(diameter, str):
        raise ValueError(f"diameter must be a number of voxels for chunked segmentation, got {diameter!r} (estimate "
                         "it with cp3d.segment on a crop, then pass it)")
    if model is None or (isinstance(model, str) and model == DEFAULT_MODEL):
        model = segment_central_crop(image, DEFAULT_MODEL, diameter=diameter, voxel_size=voxel_size,
                                     device=device).model
    name = None if isinstance(model, UNet3D) else str(model)
    if not isinstance(model, UNet3D):
        model = load_model(model)
    config = model.config
    extent = cell_extent(diameter, voxel_size, config.train_diameter)
    model_voxel = np.array([m * config.train_diameter / e for m, e in zip(config.voxel_size, extent)])
    m = config.multiple
    if context is None:
        context = config.receptive_radius
    context = -(-int(context) // m) * m
    chunks = np.broadcast_to(np.asarray(image.chunksize if chunks is None else chunks), (3,))
    if not all(float(c).is_integer() and c >= 1 for c in chunks):
        raise ValueError(f"chunks must be positive integers (z, y, x), got {chunks.tolist()!r}")
    import zarr

    scratch = _Scratch(temporary_directory)
    bounds = dask.delayed(_percentiles, pure=True)(_percentile_sample(image))
    x = image.map_blocks(_normalize, bounds=bounds, dtype=np.float32)
    factors = model_voxel / np.asarray(config.voxel_size)
    model_shape = tuple(max(1, int(round(n * f))) for n, f in zip(image.shape, factors))
    rescale = not np.allclose(factors, 1.0)
    if rescale:
        x = _zoom(x, model_shape, tuple(-(-int(c) // m) * m for c in chunks))
    pred_chunks = _prediction_chunks(model, model_shape, context, device)
    maps = _predict_chunks(dask, x, model, pred_chunks, context, augment, device)
    if rescale:
        maps = da.stack([_zoom(maps[c], image.shape, tuple(int(c) for c in chunks)) for c in range(4)])
    image_chunks = tuple(int(min(c, n)) for c, n in zip(chunks, image.shape))
    path = os.path.join(scratch.path, "maps.zarr")
    store = zarr.create_array(path, shape=maps.shape, chunks=(4,) + image_chunks, dtype=np.float32, fill_value=0.0)
    predicted = dask.delayed(_Prediction(maps.rechunk((4,) + image_chunks), store, progress), pure=False)()
    grid = da.core.normalize_chunks(image_chunks, image.shape)

    def stored(after=None, channels=slice(0, 3)):
        # The maps' store lives as long as any array read from it; the arrays handed back wait for the
        # prediction, the reconstruction's plan waits for it once (`after`) and then reads the store.
        lead = () if isinstance(channels, slice) else (channels,)
        chunks = ((3,),) + grid if isinstance(channels, slice) else grid
        return da.map_blocks(_Stored(store, scratch, lead), after=after, chunks=chunks, dtype=np.float32,
                             meta=np.empty((0,) * len(chunks), np.float32))

    flows, foreground = stored(), da.clip(stored(channels=3), 0.0, 1.0)
    settings = inspect.signature(reconstruct).bind(
        flows, foreground, **{**dict(diameter=extent, targets=config.targets,
                                     tanh_scale=model_tanh_scale(config, extent),
                                     min_border_volume=model_border_volume(config, extent),
                                     temporary_directory=temporary_directory, progress=progress), **kwargs})
    settings.apply_defaults()
    plan = _Plan(**settings.arguments)
    labels = plan.labels(after=(predicted,))
    return Segmentation(labels, stored(predicted), da.clip(stored(predicted, 3), 0.0, 1.0), {},
                        float(config.train_diameter if diameter is None else diameter), name)


def segment_central_crop(image, model=None, *, diameter="auto", voxel_size=None, shape=None, device="auto"):
    """:func:`cp3d.segment` on the central crop of a (lazy) stack: what a chunked run learns from a sample.

    The crop (at most `shape`) is read into memory and segmented without
    test-time augmentation. Its ``diameter`` is the cell size of
    ``diameter="auto"`` and its ``model`` the choice of ``model="auto"``,
    to pass to :func:`segment` for the whole stack.

    Parameters
    ----------
    image : dask.array.Array or array-like, shape (Z, Y, X)
        The stack (only the crop is read).
    model, diameter, voxel_size, device
        As in :func:`cp3d.segment`; ``diameter="auto"`` by default.
    shape : (int, int, int), optional
        The crop's largest shape (z, y, x); default ``CENTRAL_CROP``,
        (64, 256, 256): a few dozen cells of up to 40 voxels.

    Returns
    -------
    cp3d.Segmentation
        The crop's segmentation.

    Examples
    --------
    >>> import dask.array as da
    >>> import cp3d, cp3d.dask
    >>> image, _ = cp3d.data.synthetic_stack((32, 128, 128), 10, seed=1)
    >>> sample = cp3d.dask.segment_central_crop(da.from_array(image, chunks=64))  # doctest: +SKIP
    >>> sample.model, round(sample.diameter)  # doctest: +SKIP
    ('tanh', 10)
    >>> result = cp3d.dask.segment(image, sample.model, diameter=sample.diameter)  # doctest: +SKIP
    """
    from .segment import segment as segment_in_memory

    shape = as_int_triple(CENTRAL_CROP if shape is None else shape, "shape")
    box = central_box(tuple(slice(0, n) for n in image.shape), shape)
    crop = np.asarray(image[box])
    return segment_in_memory(crop, model, diameter=diameter, voxel_size=voxel_size, augment=False, device=device)


class _Prediction:
    """The task that predicts the maps chunk by chunk into the store, once (a marker file records it)."""

    def __init__(self, maps, store, progress):
        self.maps, self.store, self.progress = maps, store, progress

    def __call__(self):
        dask = _import_dask()
        done = os.path.join(str(self.store.store.root), "complete")
        if os.path.exists(done):
            return
        slices = dask.array.core.slices_from_chunks(self.maps.chunks)
        blocks = self.maps.to_delayed().ravel()
        _Runner(dask, self.progress)([dask.delayed(_store_block, pure=False)(block, self.store, box)
                                      for block, box in zip(blocks, slices)], "predict")
        open(done, "w").close()


def _store_block(block, store, box):
    store[box] = block


# Stacks above this many voxels estimate their percentiles from a strided sample, as cp3d.predict does.
_EXACT_PERCENTILES = 8_000_000
_SAMPLE = 4_000_000


def _percentile_sample(image):
    """The voxels the normalisation percentiles are taken from: all, or a strided subsample of a large stack."""
    if image.size > _EXACT_PERCENTILES:
        stride = max(1, round((image.size / _SAMPLE) ** (1 / 3)))
        image = image[::stride, ::stride, ::stride]
    return image


def _percentiles(sample, lower=1.0, upper=99.8):
    """The normalisation percentiles of the whole stack, computed once."""
    sample = np.asarray(sample, np.float32)
    if not np.isfinite(sample).all():
        raise ValueError("image contains NaN or inf values")
    lo, hi = np.percentile(sample.ravel(), [lower, upper])
    return float(lo), float(hi)


def _normalize(block, bounds):
    """A block scaled by the stack's percentiles (0 where the stack is constant), as cp3d.predict does."""
    lo, hi = bounds
    x = block.astype(np.float32)
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):
        return x * 0
    return (x - np.float32(lo)) * np.float32(1.0 / (hi - lo))


def _zoom(x, shape, chunks):
    """Linear zoom of a dask volume to `shape`, chunk by chunk (cp3d.predict's grid_mode=False zoom)."""
    import dask.array as da
    from scipy import ndimage

    factor = np.array([(n - 1) / (t - 1) if t > 1 else 0.0 for n, t in zip(x.shape, shape)])
    counts = [-(-t // c) for t, c in zip(shape, chunks)]
    blocks = np.empty(counts, object)
    for index in np.ndindex(*counts):
        out = [slice(i * c, min((i + 1) * c, t)) for i, c, t in zip(index, chunks, shape)]
        first = [int(np.floor(o.start * f)) for o, f in zip(out, factor)]
        last = [min(n, int(np.ceil((o.stop - 1) * f)) + 2) for o, f, n in zip(out, factor, x.shape)]
        source = x[tuple(slice(a, b) for a, b in zip(first, last))]
        offset = [o.start * f - a for o, f, a in zip(out, factor, first)]
        size = tuple(o.stop - o.start for o in out)
        blocks[index] = da.map_blocks(ndimage.affine_transform, source.rechunk(-1), factor, offset=offset,
                                      output_shape=size, order=1, mode="nearest", chunks=size, dtype=np.float32)
    return da.block(blocks.tolist())


def _prediction_chunks(model, model_shape, context, device):
    """Prediction chunks: the cores of the tiles cp3d.predict would choose for the whole stack.

    Each chunk with `context` on each side is then one tile within predict's
    memory budget, the tiling that computes the fewest voxels.
    """
    import torch

    from .model.predict import TILE_ELEMENTS, cheapest_tiles

    gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    config = model.config
    budget = TILE_ELEMENTS["cuda" if gpu else "cpu"] // (2 * config.base_features)
    m = config.multiple
    tiles = cheapest_tiles(model_shape, budget, (context,) * 3, (0,) * 3, m)
    padded = [-(-n // m) * m for n in model_shape]
    return tuple(int(n if t >= n else t - 2 * context) for n, t in zip(padded, tiles))


def _predict_chunks(dask, x, model, chunks, context, augment, device):
    """Network maps (4, Z, Y, X) of a normalised dask volume, each chunk predicted with `context` around it."""
    import dask.array as da

    shape = x.shape
    counts = [-(-n // c) for n, c in zip(shape, chunks)]
    blocks = np.empty(counts, object)
    net = dask.delayed(model, pure=True)
    for index in np.ndindex(*counts):
        out = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape))
        box = tuple(slice(max(0, o.start - context), min(n, o.stop + context)) for o, n in zip(out, shape))
        crop = tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(out, box))
        size = tuple(o.stop - o.start for o in out)
        task = dask.delayed(_predict_box, pure=True)(x[box], net, crop, context, augment, device)
        blocks[index] = da.from_delayed(task, (4,) + size, np.float32)
    return da.block(blocks.tolist())


def _predict_box(x, model, crop, context, augment, device):
    from .model import predict

    p = predict(np.asarray(x, np.float32), model, context=context, augment=augment, device=device,
                normalize=False)
    return np.concatenate([p.flows, p.foreground[None]])[(slice(None),) + crop]
