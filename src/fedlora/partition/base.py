"""One entry point for every partitioning scheme, its registry, output checks and per-client test splits.

A scheme is a function ``(labels, num_clients, seed, **options) -> list[np.ndarray]`` registered under a
name with :func:`register`. Its options are its other parameters: each has a default and a type annotation,
and :func:`partition_options` / :func:`partition_option_types` read them from the signature (the config
checks ``partition.options`` against them). :func:`partition_labels` looks a scheme up, checks its options,
and checks what it returns: one non-empty array of example indices per client, pairwise disjoint, inside
``range(len(labels))``. Indices come back sorted, so the same seed gives identical arrays. Schemes may leave
examples unassigned (``pathological`` with unused classes, ``imbalanced`` when a class runs short): the union
is a subset.
"""

from __future__ import annotations

import inspect
import typing
import warnings
from collections.abc import Callable

import numpy as np

Partition = list[np.ndarray]
PartitionFn = Callable[..., Partition]
PARTITIONERS: dict[str, PartitionFn] = {}
SCHEME_ARGS = ("labels", "num_clients", "seed")  # every scheme's leading parameters; the rest are options


class PartitionError(ValueError):
    """A partition cannot be made as asked; the message says which constraint failed and what to change."""


def register(name: str) -> Callable[[PartitionFn], PartitionFn]:
    """Decorator adding a scheme to :data:`PARTITIONERS` under ``name``.

    The function must take ``labels, num_clients, seed`` first; every further parameter is an option and
    needs a default and a type annotation (a ``TypeError`` at import otherwise).
    """

    def add(fn: PartitionFn) -> PartitionFn:
        params = list(inspect.signature(fn).parameters.values())
        if tuple(p.name for p in params[:3]) != SCHEME_ARGS:
            raise TypeError(f"partition scheme {name!r}: parameters must start with {', '.join(SCHEME_ARGS)}")
        for p in params[3:]:
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.default is p.empty \
                    or p.annotation is p.empty:
                raise TypeError(f"partition scheme {name!r}: option {p.name!r} needs a default and a type")
        if name in PARTITIONERS:
            raise ValueError(f"partition scheme {name!r} registered twice")
        PARTITIONERS[name] = fn
        return fn

    return add


def _scheme(name: str) -> PartitionFn:
    try:
        return PARTITIONERS[name]
    except KeyError:
        raise PartitionError(f"unknown partition scheme {name!r}; known: {', '.join(sorted(PARTITIONERS))}") \
            from None


def partition_options(name: str) -> dict[str, object]:
    """The keyword options of scheme ``name`` and their defaults, read from its signature.

    Examples
    --------
    >>> partition_options("dirichlet")
    {'alpha': 0.3, 'min_partition_size': 1, 'self_balancing': False}
    """
    params = inspect.signature(_scheme(name)).parameters.values()
    return {p.name: p.default for p in params if p.name not in SCHEME_ARGS}


def partition_option_types(name: str) -> dict[str, object]:
    """The type annotation of each option of scheme ``name`` (resolved, ``Literal`` and unions kept)."""
    hints = typing.get_type_hints(_scheme(name))
    return {option: hints[option] for option in partition_options(name)}


def partition_labels(labels, num_clients: int, scheme: str = "iid", seed: int = 42, **options) -> Partition:
    """Split example indices among clients.

    Parameters
    ----------
    labels : array-like
        One label per example, shape ``(N,)``: class ids for label-aware schemes (``dirichlet``,
        ``pathological``, ``imbalanced``); anything for ``iid`` and ``quantity_skew``.
    num_clients : int
        Number of clients ``K``, ``1 <= K <= N``.
    scheme : str (default: "iid")
        A key of :data:`PARTITIONERS`: ``iid``, ``dirichlet`` (``alpha``), ``pathological``
        (``classes_per_client``), ``quantity_skew`` (``beta`` or ``exponent``), ``imbalanced``
        (``dominant_fraction``).
    seed : int (default: 42)
        Seed of every random choice; the same seed gives identical partitions.
    **options
        The scheme's keyword options (see each scheme's docstring).

    Returns
    -------
    list of np.ndarray
        ``K`` sorted ``int64`` index arrays, non-empty and pairwise disjoint.

    Raises
    ------
    PartitionError
        Unknown scheme or option, ``K`` out of range, or a scheme that cannot give every client an example.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be 1-D, got shape {labels.shape}")
    if not 1 <= num_clients <= len(labels):
        raise PartitionError(f"num_clients must be in 1..{len(labels)} (the number of examples), "
                             f"got {num_clients}")
    fn = _scheme(scheme)
    allowed = list(partition_options(scheme))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise PartitionError(f"scheme {scheme!r} takes options {allowed}; got unknown {unknown}")
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in fn(labels, num_clients, seed=seed, **options)]
    _check_partition(parts, num_clients, len(labels), scheme)
    return parts


def class_ids(labels: np.ndarray, scheme: str) -> np.ndarray:
    """``labels`` as ``int64`` class ids, or a :class:`PartitionError` for float (regression) labels."""
    if np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_):
        return labels.astype(np.int64)
    if np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0):
        return labels.astype(np.int64)
    raise PartitionError(f"scheme {scheme!r} needs integer class labels, got dtype {labels.dtype}; "
                         f"bin regression scores first (e.g. np.floor(scores).astype(int))")


def flwr_indices(partitioner, labels: np.ndarray, order: np.ndarray | None = None,
                 read_cache: bool = True) -> Partition:
    """Run a ``flwr_datasets`` partitioner on ``labels`` and return example indices per partition.

    The partitioner sees a ``datasets.Dataset`` with columns ``label`` and ``idx`` (the original index),
    in ``order`` if given (a permutation: flwr's IID and size partitioners cut contiguous blocks, so the
    order is where their randomness comes from). The public way to read a partition, ``load_partition(k)``
    then its ``idx`` column, costs about a second per client on 67k examples: ``Dataset.select`` hashes
    the index list (pickled with dill) for its fingerprint. So when the partitioner keeps its assignment in
    ``_partition_id_to_indices`` (Dirichlet, Pathological, Size in flwr-datasets 0.6) and
    ``read_cache`` is on, that is read instead; otherwise, or with another version, ``load_partition``.
    Flower's warnings (Dirichlet resampling, unused classes) are silenced: callers check the result.
    """
    import datasets

    order = np.arange(len(labels)) if order is None else np.asarray(order, dtype=np.int64)
    table = datasets.Dataset.from_dict({"label": labels[order], "idx": order})
    # Arrow format: flwr reads the label column with np.array(dataset["label"]); datasets 4 returns a lazy
    # Column for the default format, turned into an array row by row (~1 s per 67k rows).
    partitioner.dataset = table.with_format("arrow")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        num_partitions = partitioner.num_partitions  # runs the lazy, cached assignment where there is one
        cached = getattr(partitioner, "_partition_id_to_indices", None) if read_cache else None
        if isinstance(cached, dict) and sorted(cached) == list(range(num_partitions)):
            return [order[np.asarray(cached[k], dtype=np.int64)] for k in range(num_partitions)]
        return [np.asarray(partitioner.load_partition(k)["idx"], dtype=np.int64)
                for k in range(num_partitions)]


def client_test_split(indices, fraction: float, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Carve a client's local test split out of its indices.

    Parameters
    ----------
    indices : array-like
        One client's example indices.
    fraction : float
        Share of them held out, in ``[0, 1)``; rounded, at least 1 if ``fraction > 0`` and the client has
        two or more examples, and never all of them.
    seed : int (default: 42)
        Seed of the random hold-out (use e.g. ``seed + client_id`` to vary it across clients).

    Returns
    -------
    tuple of np.ndarray
        ``(train, test)`` sorted index arrays, disjoint, together equal to ``indices``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if not 0.0 <= fraction < 1.0:
        raise PartitionError(f"test fraction must be in [0, 1), got {fraction}")
    n_test = int(round(fraction * len(indices)))
    if fraction > 0 and len(indices) >= 2:
        n_test = min(max(n_test, 1), len(indices) - 1)
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])


def _check_partition(parts: Partition, num_clients: int, num_examples: int, scheme: str) -> None:
    if len(parts) != num_clients:
        raise PartitionError(f"scheme {scheme!r} made {len(parts)} partitions, expected {num_clients}")
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise PartitionError(f"scheme {scheme!r} left clients {empty} without examples; use fewer clients "
                             f"or a less extreme setting")
    flat = np.concatenate(parts)
    if flat.min() < 0 or flat.max() >= num_examples:
        raise PartitionError(f"scheme {scheme!r} returned an index outside 0..{num_examples - 1}")
    if len(np.unique(flat)) != len(flat):
        raise PartitionError(f"scheme {scheme!r} assigned an example to two clients")
